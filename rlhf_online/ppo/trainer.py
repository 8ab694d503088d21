"""A PPO round end to end: read the log -> score -> advantages -> update -> gate -> publish.

The policy warm-starts from the head of the line of versions (canary.controller.head): CURRENT,
or with canaries on, the newest candidate users are judging or will judge, so rounds never wait
for a canary's decision. Its batch is what that version already served to users and logged
(ppo.logged: exact on-policy samples, rewarded by their users' ratings through the Reward
service), topped up with rollouts of its own when that traffic is thin (right after a swap, or a
candidate not yet served). The candidate is judged on the served version's held-out traffic,
importance-weighted to the candidate, or, with too little of it, on sampled replies to held-out
prompts with fixed seeds: published only if the reward did not drop beyond noise, the KL to the
reference stays within budget and every number is finite; otherwise the round is recorded as
rejected with the reason and the next round starts again from the same version. A published
candidate becomes CURRENT at once, or with canaries on, waits in line for its users' verdict
(canary.controller).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf_online import metrics
from rlhf_online.adapters.registry import AdapterRegistry
from rlhf_online.canary.controller import CanaryController, head
from rlhf_online.data.split import HELDOUT_PERCENT, is_heldout
from rlhf_online.errors import RlhfError
from rlhf_online.ppo import logged, steps
from rlhf_online.ppo.config import PPOConfig, TrainerConfig
from rlhf_online.ppo.core import AdaptiveKLController, FixedKLController, KLBudgetPressure
from rlhf_online.ppo.distributed import SINGLE, Ranks, RanksLost
from rlhf_online.ppo.policy import PolicyWithValue
from rlhf_online.store import Store

log = logging.getLogger("rlhf_online.trainer")
ROUND, STOP = "round", "stop"  # rank 0's commands to the other ranks
NEXT_KL_PRESSURE = "trainer/next_kl_pressure"  # a round's stat and manifest metric: the factor its successor uses


@dataclass
class RoundResult:
    """What a round did: "published" | "rejected" | "skipped", the version, why, and its numbers."""

    outcome: str
    version: str = ""
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def split_prompts(store: Store, heldout_percent: int, window: int) -> tuple[list[str], list[str]]:
    """Distinct plain prompts of the newest `window` completions, split (by a hash of the text) into training and
    held-out ones."""
    prompts = store.recent_prompts(window)
    held = [p for p in prompts if is_heldout(p, heldout_percent)]
    held_set = set(held)  # once: `p not in set(held)` built the set again for every prompt (quadratic)
    return [p for p in prompts if p not in held_set], held


def verdict(diff: float, se: float, kl: float, kl_budget: float, summary: str, z: float = 2.0,
            kl_se: float = math.nan) -> tuple[bool, str]:
    """Publish only if every number is finite, KL is within budget, and the reward did not drop beyond z standard errors.

    The budget is read on the KL's estimate itself (a safety bound, not a test); its standard error
    is said beside it, so a refusal within noise of the budget shows as one.
    """
    if not all(math.isfinite(x) for x in (diff, se, kl)):
        return False, "non-finite evaluation"
    if kl > kl_budget:
        return False, f"KL to reference {kl:.2f}{_pm(kl_se)} over budget {kl_budget:.2f}"
    if diff < -z * se:
        return False, f"held-out reward dropped: {summary}"
    return True, summary


def _pm(se: float) -> str:
    """' ± 0.93' for a finite standard error, else nothing."""
    return f" ± {se:.2f}" if math.isfinite(se) else ""


def paired_se(candidate: list[float], current: list[float]) -> float:
    """Standard error of the mean paired difference (nan with fewer than two pairs)."""
    diffs = [c - p for c, p in zip(candidate, current, strict=True)]
    if len(diffs) < 2:  # one pair says nothing about the spread
        return math.nan
    mean = sum(diffs) / len(diffs)
    return math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))


def gate(candidate: dict, current: dict, kl_budget: float, z: float = 2.0) -> tuple[bool, str]:
    """The gate on sampled replies: paired rewards (same prompts, same seeds) of the candidate and the served version.

    A drop counts when the mean paired difference is below -z standard errors of it, so a round
    that changed nothing is not rejected for sampling noise, and one that made the policy worse is.
    """
    diffs = [c - p for c, p in zip(candidate["rewards"], current["rewards"], strict=True)]
    if not diffs or not math.isfinite(current["eval/kl"]):
        return False, "non-finite evaluation"
    mean = sum(diffs) / len(diffs)
    se = paired_se(candidate["rewards"], current["rewards"]) if len(diffs) > 1 else 0.0  # one pair: any drop counts
    kl_se = candidate.get("eval/kl_se", math.nan)
    summary = (f"held-out reward {current['eval/reward']:.4f} -> {candidate['eval/reward']:.4f} "
               f"(paired diff {mean:+.4f} ± {se:.4f} on {len(diffs)} samples), KL {candidate['eval/kl']:.2f}{_pm(kl_se)}")
    return verdict(mean, se, candidate["eval/kl"], kl_budget, summary, z, kl_se)


def gate_on_traffic(v: logged.TrafficVerdict, kl_budget: float, z: float = 2.0) -> tuple[bool, str]:
    """The gate on the served version's held-out traffic, importance-weighted to the candidate."""
    diff = v.reward_candidate - v.reward_current
    summary = (f"held-out traffic reward {v.reward_current:.4f} -> {v.reward_candidate:.4f} (importance-weighted, "
               f"diff {diff:+.4f} ± {v.diff_se:.4f} on {v.samples} logged replies, ESS {100 * v.ess_share:.0f}%), "
               f"KL {v.kl_candidate:.2f}{_pm(v.kl_se)}")
    return verdict(diff, v.diff_se, v.kl_candidate, kl_budget, summary, z, v.kl_se)


def failure_reason(error: Exception) -> str:
    """A failed round's reason for RunRound and GetStatus: a domain error's message, else the exception's type."""
    # Domain messages are written for callers; any other may name files or library internals (the log has it).
    if isinstance(error, RlhfError):
        return f"round failed: {type(error).__name__}: {error}"
    return f"round failed: {type(error).__name__} (the trainer's log has the details)"


class Trainer:
    """Runs rounds on its own copy of the model and publishes into the adapter registry."""

    def __init__(self, config: TrainerConfig, ppo: PPOConfig, store: Store, registry: AdapterRegistry,
                 reward_fn: steps.RewardFn, load_base: Callable[[], tuple[Any, Any]], *, base_model: str,
                 reward_not_ready: Callable[[], str] | None = None, heldout_percent: int = HELDOUT_PERCENT,
                 canary: CanaryController | None = None, ranks: Ranks = SINGLE) -> None:
        self.config, self.ppo, self.base_model = config, ppo, base_model  # base_model: recorded in manifests
        self.heldout_percent = heldout_percent  # the same setting as the reward model's, so both hold out alike
        self.store, self.registry, self.reward_fn = store, registry, reward_fn
        # Why the reward cannot be trusted yet ("" = it can): rounds against an untrained
        # learned reward would see all-zero scores and publish pure drift.
        self.reward_not_ready = reward_not_ready or (lambda: "")
        self.load_base = load_base
        self.canary = canary  # None: a candidate that passes the gate becomes CURRENT at once
        # With several ranks (torchrun), rank 0 is this trainer and the others run `follow()`.
        self.ranks = ranks
        _, self.tokenizer = load_base()
        self.kl_ctl = (AdaptiveKLController(self.ppo.init_kl_coef, self.ppo.target_kl, self.ppo.kl_horizon)
                       if self.ppo.adaptive_kl else FixedKLController(self.ppo.init_kl_coef))
        # Resumed from the head's manifest: a restart that dropped it would overshoot the budget again.
        self.kl_pressure = KLBudgetPressure(self.kl_stop_line(), config.kl_pressure_rate, self._saved_kl_pressure())
        self.rounds_total = 0
        self.last = RoundResult("skipped", reason="no round yet")
        self.in_progress = threading.Event()
        # Set when a collective failed: the group cannot train again, the service must exit for a restart.
        self.ranks_lost = threading.Event()
        self.feedback_seq_at_last_round = 0  # the newest feedback seq when the last round started
        self.rng = random.Random(self.ppo.seed)
        # The gate's held-out prompts, fixed once there are enough, so evaluations stay comparable
        # across rounds; and the replies of recent evaluations by (version, prompts): a version's
        # replies under the fixed seed never change, only the reward model that scores them does.
        self.eval_prompts: list[str] = []
        self._eval_cache: dict[tuple[str, tuple[str, ...]], tuple[list[str], float, float]] = {}  # (texts, KL, its SE)
        self._candidate_replies: tuple[list[str], dict[str, Any]] | None = None
        self.last_round_started_at = 0.0  # logged traffic newer than this is new to the next round

    def _policy(self, version: str) -> PolicyWithValue:
        """A fresh trainable policy warm-started from `version` ("" = a new LoRA on the bare base)."""
        base, _ = self.load_base()
        return PolicyWithValue(base, self.ppo, self.registry.path(version) if version else None)

    def run_round(self) -> RoundResult:
        """One round; never raises for a bad round, it records it."""
        self.in_progress.set()
        t0 = time.time()
        try:
            result = self._round()
        except RanksLost as e:  # recorded like any failed round; then the process exits (services.bootstrap)
            log.error("round failed: a trainer rank is gone", extra={"error": str(e)})
            result = RoundResult("rejected", reason=failure_reason(e))
            self.ranks_lost.set()
        except Exception as e:  # a crashed round is a rejected round with the reason, the service lives on
            log.exception("round failed")
            result = RoundResult("rejected", reason=failure_reason(e))
        finally:
            self.in_progress.clear()
        seconds = time.time() - t0
        result.metrics["time/round_seconds"] = round(seconds, 2)
        self.rounds_total += 1
        self.last = result
        metrics.TRAINER_ROUNDS.labels(result.outcome).inc()
        metrics.TRAINER_ROUND_SECONDS.observe(seconds)
        for k, v in result.metrics.items():
            metrics.PPO_STATS.labels(k).set(v)
        metrics.KL_COEF.set(self.kl_coef())
        log.info("round", extra={"outcome": result.outcome, "version": result.version, "reason": result.reason,
                                 "seconds": round(seconds, 1), "next_kl_coef": round(self.kl_coef(), 5)})
        return result

    def _round(self) -> RoundResult:
        """Read the served version's traffic (top it up with own rollouts if thin), score, update, gate, publish."""
        self.feedback_seq_at_last_round = self.newest_feedback_seq()
        started = time.time()
        self._candidate_replies = None
        current = head(self.registry)  # CURRENT, or the newest candidate users are judging or will judge
        times = dict.fromkeys(("time/rollout_seconds", "time/forward_seconds", "time/score_seconds",
                               "time/update_seconds"), 0.0)
        t = time.time()
        traffic = (logged.read(self.store, current, self.ppo, self.config, self.heldout_percent)
                   if self.config.learn_from_traffic else logged.LoggedBatch([], [], Counter()))
        own = len(traffic.train) < self.config.min_logged_samples  # thin traffic: sample rollouts too
        more = self.config.updates_per_round > 1  # the further updates sample rollouts of their own
        train = split_prompts(self.store, self.heldout_percent, self.config.prompt_window)[0] if own or more else []
        if own and len(train) < self.config.min_prompts:
            return RoundResult("skipped", reason=f"{len(traffic.train)} logged on-policy completions < "
                                                 f"min_logged_samples {self.config.min_logged_samples} and {len(train)} "
                                                 f"logged prompts < min_prompts {self.config.min_prompts}")
        if waiting := self.reward_not_ready():
            return RoundResult("skipped", reason=waiting)
        self.last_round_started_at = started  # the traffic read above is used; what arrives from now on is new
        policy = self._policy(current)
        served_weights = policy.trainable_state()  # the gate compares the candidate with these
        times["time/read_log_seconds"] = time.time() - t
        samples = list(traffic.train)
        if own:
            samples += self._rollouts(policy, train, times)
        stats = self._update(policy, samples, times)
        updates, kl_stopped = 1, False
        # A further update first measures the policy on fresh rollouts: past round_kl_stop of the budget it stops,
        # so a round that would overshoot publishes the updates before (a three-update round moved 5-9 nats late in
        # a demo, and the gate refused it whole for KL over the budget).
        kl_stop = self.kl_stop_line() if self.config.round_kl_stop < 1 else math.inf
        while updates < self.config.updates_per_round and len(train) >= self.config.min_prompts:
            further = self._update(policy, self._rollouts(policy, train, times), times, kl_stop)
            if further is None:
                kl_stopped = True
                break
            stats, updates = further, updates + 1
        stats.update({"trainer/ranks": float(self.ranks.world), "trainer/updates": float(updates),
                      "trainer/kl_stopped": float(kl_stopped),
                      "samples/logged": float(len(traffic.train)),
                      "samples/own": float(len(samples) - len(traffic.train) + (updates - 1) * self.ppo.batch_size),
                      "samples/not_on_policy": float(sum(traffic.left_out.values())),
                      # rewarded by their users' ratings (the Reward service combines them with its score)
                      "samples/rated": float(len(self.store.rating_evidence([s.completion_id for s in traffic.train])))})
        t = time.time()
        passed, reason, evaluation = self._gate(policy, served_weights, current)
        times["time/eval_seconds"] = time.time() - t
        self.kl_pressure.update(evaluation.get("eval/kl", math.nan))  # published or refused: where the update went
        stats[NEXT_KL_PRESSURE] = self.kl_pressure.value  # the next round's factor on beta (kept in the manifest)
        numbers = {**stats, **times, **evaluation}
        if not passed:
            return RoundResult("rejected", reason=reason, metrics=numbers)
        version = self.registry.publish(policy.save, base_model=self.base_model, parent=current,
                                        metrics={k: v for k, v in numbers.items() if math.isfinite(v)})
        if self.canary is None:
            self.registry.activate(version)
        else:  # its users decide: it waits its turn as the canary (at once when none is live)
            self.canary.queue(version)
            try:
                self.canary.step()
            except Exception:  # published and queued all the same: the controller's poll tries again
                log.exception("canary controller step after publish failed")
        self.registry.prune(self.config.keep_versions)
        if self._candidate_replies is not None:
            self._remember(version, *self._candidate_replies)
        return RoundResult("published", version=version, reason=reason, metrics=numbers)

    def _rollouts(self, policy: PolicyWithValue, prompts: list[str], times: dict[str, float]) -> list[steps.Sample]:
        """batch_size replies of the policy as it is now, to prompts drawn from `prompts`."""
        t = time.time()
        drawn = [self.rng.choice(prompts) for _ in range(self.ppo.batch_size)]
        samples = steps.sample(policy, self.tokenizer, drawn, self.ppo)
        times["time/rollout_seconds"] += time.time() - t
        return samples

    def _update(self, policy: PolicyWithValue, samples: list[steps.Sample], times: dict[str, float],
                kl_stop: float = math.inf) -> dict[str, float] | None:
        """One PPO update on these samples (every rank takes part): measure, score, advantages, epochs.

        None, with the policy untouched, when the samples' mean KL to the reference is over `kl_stop`.
        """

        def timed(name: str, since: float) -> None:
            times[name] += time.time() - since

        t = time.time()
        if self.ranks.world > 1:  # the other ranks join here: the starting weights and the samples
            self.ranks.broadcast((ROUND, policy.trainable_state(), samples))
        rollouts = steps.measure(policy, samples, self.tokenizer.pad_token_id, self.ppo, self.ranks)
        timed("time/forward_seconds", t)
        if (kl := steps.sequence_kl(rollouts)) > kl_stop:
            self.ranks.broadcast(None)  # the other ranks leave this update too
            log.info("update not made: the policy is past the KL stop",
                     extra={"kl": round(kl, 2), "kl_stop": round(kl_stop, 2)})
            return None
        t = time.time()
        try:
            scores = steps.score(rollouts, self.reward_fn, self.ppo)
        except BaseException:
            self.ranks.broadcast(None)  # the other ranks leave this update; this one records why it failed
            raise
        scores, kl_coef = self.ranks.broadcast((scores, self.kl_coef()))
        timed("time/score_seconds", t)
        adv, returns, stats = steps.advantages(rollouts, scores, kl_coef, self.ppo)
        t = time.time()
        # A fresh AdamW every update, not TRL's one for the whole run: carried from round to round, its moments made
        # the policy drift further from the reference for no more reward (bench ppo-learning, docs/benchmarks.md).
        optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=self.ppo.learning_rate)
        stats.update(steps.update(policy, optimizer, rollouts, adv, returns, self.ppo, self.ranks))
        timed("time/update_seconds", t)
        self.kl_ctl.update(stats["objective/kl"], len(samples))
        return stats

    def kl_stop_line(self) -> float:
        """KL (nats per response) past which the KL penalty rises (and, under 1, a round makes no further update)."""
        return self.config.round_kl_stop * self.config.kl_budget

    def _saved_kl_pressure(self) -> float:
        """The budget's pressure as the head version's round left it (1 with no version or none recorded)."""
        version = head(self.registry)
        if not version:
            return 1.0
        try:
            saved = float(self.registry.info(version).get("metrics", {}).get(NEXT_KL_PRESSURE, 1.0))
        except (OSError, ValueError, RlhfError):  # an unreadable manifest: start afresh, the round will say more
            return 1.0
        return saved if math.isfinite(saved) else 1.0

    def kl_coef(self) -> float:
        """beta of the next update: the adaptive (or fixed) controller's, times the budget's pressure."""
        return self.kl_ctl.value * self.kl_pressure.value

    def release_followers(self) -> None:
        """Rank 0, on shutdown: the other ranks' `follow()` returns."""
        if self.ranks.world > 1:
            self.ranks.broadcast((STOP,))

    def _gate(self, policy: PolicyWithValue, served_weights: dict[str, torch.Tensor], current: str
              ) -> tuple[bool, str, dict[str, float]]:
        """Judge the updated policy on the served version's held-out traffic, or by sampling when that is too thin.

        The held-out traffic is read now, not when the round started: the served version kept serving
        (and its users kept rating) while the round trained, so there is more of it.
        """
        held_samples = (logged.read(self.store, current, self.ppo, self.config, self.heldout_percent).heldout
                        if self.config.learn_from_traffic else [])
        numbers = {"samples/heldout_logged": float(len(held_samples))}
        if len(held_samples) >= self.config.gate_min_samples:
            candidate = steps.measure(policy, held_samples, self.tokenizer.pad_token_id, self.ppo)
            with policy.using(served_weights):
                served = steps.response_logprobs(policy, candidate, self.ppo)
            scores = steps.score(candidate, self.reward_fn, self.ppo)
            v = logged.judge_on_traffic(served, candidate.logprobs, candidate.ref_logprobs, scores)
            numbers.update({"eval/on_traffic": 1.0, "eval/reward_current": v.reward_current,
                            "eval/reward": v.reward_candidate, "eval/reward_diff_se": v.diff_se,
                            "eval/kl_current": v.kl_current,
                            "eval/kl": v.kl_candidate, "eval/kl_se": v.kl_se, "eval/ess_share": v.ess_share})
            if v.ess_share >= self.config.gate_min_ess:
                passed, reason = gate_on_traffic(v, self.config.kl_budget)
                return passed, reason, numbers
            log.info("candidate moved too far to be judged on traffic; sampling instead",
                     extra={"ess_share": round(v.ess_share, 3)})
        train, held = split_prompts(self.store, self.heldout_percent, self.config.prompt_window)
        held = self._gate_prompts(held or train)
        before = self._evaluate(lambda: self._policy(current), current, held)
        after = self._evaluate(lambda: policy, None, held)
        numbers.update({"eval/on_traffic": 0.0, **{f"{k}_current": v for k, v in before.items() if k.startswith("eval/")},
                        **{k: v for k, v in after.items() if k.startswith("eval/")}})
        passed, reason = gate(after, before, self.config.kl_budget)
        numbers["eval/reward_diff_se"] = paired_se(after["rewards"], before["rewards"])
        self._candidate_replies = (held, after)  # remembered under its version if it is published
        return passed, reason, numbers

    def _gate_prompts(self, held: list[str]) -> list[str]:
        """The gate's prompts: held-out ones as they are first seen, frozen once there are eval_prompts of them."""
        want = self.config.eval_prompts
        for p in held:
            if len(self.eval_prompts) >= want:
                break
            if p not in self.eval_prompts:
                self.eval_prompts.append(p)
        return list(self.eval_prompts)

    def _evaluate(self, policy: Callable[[], PolicyWithValue], version: str | None, held: list[str]) -> dict[str, Any]:
        """Evaluate on held-out prompts; a version evaluated before on them is only re-scored, not re-sampled."""
        key = (version, tuple(held))
        if version is not None and key in self._eval_cache:
            texts, kl, kl_se = self._eval_cache[key]
            prompts = [p for p in held for _ in range(self.config.eval_samples_per_prompt)]
            return steps.score_evaluation(prompts, texts, kl, self.reward_fn, kl_se)
        result = steps.evaluate(policy(), self.tokenizer, held, self.reward_fn, self.ppo, self.config.eval_seed,
                                self.config.eval_samples_per_prompt)
        if version is not None:
            self._remember(version, held, result)
        return result

    def _remember(self, version: str, held: list[str], result: dict[str, Any]) -> None:
        self._eval_cache[(version, tuple(held))] = (result["texts"], result["eval/kl"], result["eval/kl_se"])
        while len(self._eval_cache) > 4:  # only the latest few versions can be CURRENT again soon
            self._eval_cache.pop(next(iter(self._eval_cache)))

    def newest_feedback_seq(self) -> int:
        """The seq of the newest thumbs rating (0 with none)."""
        newest = self.store.list_feedback(limit=1, newest=True)
        return newest[0].seq if newest else 0

    def feedback_since_last_round(self) -> int:
        """Thumbs ratings since the last round started (counted by seq: a range of the key, not the history).

        A rating that commits after a later one may be counted a round late: this is a trigger, not a read.
        """
        return self.store.count_feedback(after_seq=self.feedback_seq_at_last_round)

    def due(self, last_round_at: float, now: float | None = None) -> bool:
        """A round is due: enough new traffic of the served version or new feedback since the last round, or the interval passed."""
        s = self.config
        if s.learn_from_traffic and s.round_min_traffic and self.store.count_served(
                head(self.registry), self.last_round_started_at) >= s.round_min_traffic:
            return True
        if s.round_min_feedback and self.feedback_since_last_round() >= s.round_min_feedback:
            return True
        now = time.time() if now is None else now
        return bool(s.round_interval_seconds) and now - last_round_at >= s.round_interval_seconds


def follow(ppo: PPOConfig, load_base: Callable[[], tuple[Any, Any]], ranks: Ranks) -> int:
    """Ranks other than 0 (torchrun): take part in rank 0's rounds, its forward passes and updates, until it says stop;
    returns how many rounds it trained in.

    Rank 0 reads the store, samples, calls the reward service, gates and publishes; here only the
    data-parallel steps run (ppo.distributed), in the same order of collectives as rank 0's round.
    """
    _, tokenizer = load_base()
    trained = 0
    while (command := ranks.broadcast(None))[0] != STOP:
        _, state, samples = command
        base, _ = load_base()
        policy = PolicyWithValue(base, ppo)  # the same LoRA layout as rank 0's, then rank 0's starting weights
        policy.load_trainable(state)
        rollouts = steps.measure(policy, samples, tokenizer.pad_token_id, ppo, ranks)
        shared = ranks.broadcast(None)
        if shared is None:  # rank 0 could not score: the round failed there, and it records why
            continue
        scores, kl_coef = shared
        adv, returns, _ = steps.advantages(rollouts, scores, kl_coef, ppo)
        optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=ppo.learning_rate)
        steps.update(policy, optimizer, rollouts, adv, returns, ppo, ranks)
        trained += 1
    return trained


def load_base_model(path: Path, device: str = "cpu") -> Callable[[], tuple[Any, Any]]:
    """A loader of fresh fp32 copies of the base model (training needs its own, unshared weights)."""
    from rlhf_online.models.provision import load_model

    return lambda: load_model(path, device=device)
