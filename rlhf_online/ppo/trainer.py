"""A PPO round end to end: collect -> score -> advantages -> update -> evaluate -> gate -> publish.

The policy warm-starts from the served adapter (CURRENT) and its candidate is compared with it on
held-out prompts with fixed sampling seeds: published only if the mean reward did not drop, the
KL to the reference stays within budget and every number is finite; otherwise the round is
recorded as rejected with the reason and the next round starts again from the served version.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf_online import metrics
from rlhf_online.adapters.registry import AdapterRegistry
from rlhf_online.data.split import HELDOUT_PERCENT, is_heldout
from rlhf_online.ppo import steps
from rlhf_online.ppo.config import PPOConfig, TrainerConfig
from rlhf_online.ppo.core import AdaptiveKLController, FixedKLController
from rlhf_online.ppo.policy import PolicyWithValue
from rlhf_online.store import Store

log = logging.getLogger("rlhf_online.trainer")


@dataclass
class RoundResult:
    """What a round did: "published" | "rejected" | "skipped", the version, why, and its numbers."""

    outcome: str
    version: str = ""
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def split_prompts(store: Store, heldout_percent: int) -> tuple[list[str], list[str]]:
    """Distinct logged plain prompts, split (by a hash of the text) into training and held-out ones."""
    prompts = store.distinct_prompts()
    held = [p for p in prompts if is_heldout(p, heldout_percent)]
    return [p for p in prompts if p not in set(held)], held


def gate(candidate: dict, current: dict, kl_budget: float, z: float = 2.0) -> tuple[bool, str]:
    """Publish only if nothing is NaN, KL is within budget, and the held-out reward did not drop beyond noise.

    Rewards are paired (same prompts, same sampling seeds): a drop counts when the mean paired
    difference is below -z standard errors of it, so a round that changed nothing is not rejected
    for sampling noise, and one that made the policy worse is.
    """
    diffs = [c - p for c, p in zip(candidate["rewards"], current["rewards"], strict=True)]
    numbers = [*diffs, candidate["eval/kl"], current["eval/kl"]]
    if not diffs or not all(math.isfinite(x) for x in numbers):
        return False, "non-finite evaluation"
    if candidate["eval/kl"] > kl_budget:
        return False, f"KL to reference {candidate['eval/kl']:.2f} over budget {kl_budget:.2f}"
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1) / len(diffs))
    summary = (f"held-out reward {current['eval/reward']:.4f} -> {candidate['eval/reward']:.4f} "
               f"(paired diff {mean:+.4f} ± {se:.4f} on {len(diffs)} samples), KL {candidate['eval/kl']:.2f}")
    if mean < -z * se:
        return False, f"held-out reward dropped: {summary}"
    return True, summary


class Trainer:
    """Runs rounds on its own copy of the model and publishes into the adapter registry."""

    def __init__(self, config: TrainerConfig, ppo: PPOConfig, store: Store, registry: AdapterRegistry,
                 reward_fn: steps.RewardFn, load_base: Callable[[], tuple[Any, Any]], *, base_model: str,
                 reward_not_ready: Callable[[], str] | None = None, heldout_percent: int = HELDOUT_PERCENT) -> None:
        self.config, self.ppo, self.base_model = config, ppo, base_model  # base_model: recorded in manifests
        self.heldout_percent = heldout_percent  # the same setting as the reward model's, so both hold out alike
        self.store, self.registry, self.reward_fn = store, registry, reward_fn
        # Why the reward cannot be trusted yet ("" = it can): rounds against an untrained
        # learned reward would see all-zero scores and publish pure drift.
        self.reward_not_ready = reward_not_ready or (lambda: "")
        self.load_base = load_base
        _, self.tokenizer = load_base()
        self.kl_ctl = (AdaptiveKLController(self.ppo.init_kl_coef, self.ppo.target_kl, self.ppo.kl_horizon)
                       if self.ppo.adaptive_kl else FixedKLController(self.ppo.init_kl_coef))
        self.rounds_total = 0
        self.last = RoundResult("skipped", reason="no round yet")
        self.in_progress = threading.Event()
        self.feedback_at_last_round = 0
        self.rng = random.Random(self.ppo.seed)
        # The gate's held-out prompts, fixed once there are enough, so evaluations stay comparable
        # across rounds; and the replies of recent evaluations by (version, prompts): a version's
        # replies under the fixed seed never change, only the reward model that scores them does.
        self.eval_prompts: list[str] = []
        self._eval_cache: dict[tuple[str, tuple[str, ...]], tuple[list[str], float]] = {}

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
        except Exception as e:  # a crashed round is a rejected round with the reason, the service lives on
            log.exception("round failed")
            result = RoundResult("rejected", reason=f"round failed: {type(e).__name__}: {e}")
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
        metrics.KL_COEF.set(self.kl_ctl.value)
        log.info("round", extra={"outcome": result.outcome, "version": result.version, "reason": result.reason,
                                 "seconds": round(seconds, 1)})
        return result

    def _round(self) -> RoundResult:
        self.feedback_at_last_round = self.store.count_feedback()
        train, held = split_prompts(self.store, self.heldout_percent)
        if len(train) < self.config.min_prompts:
            return RoundResult("skipped", reason=f"{len(train)} logged prompts < min_prompts {self.config.min_prompts}")
        held = self._gate_prompts(held or train)
        if waiting := self.reward_not_ready():
            return RoundResult("skipped", reason=waiting)
        current = self.registry.current()
        policy = self._policy(current)
        times: dict[str, float] = {}
        t = time.time()
        before = self._evaluate(policy, current, held)
        times["time/eval_seconds"] = time.time() - t
        t = time.time()
        batch = [self.rng.choice(train) for _ in range(self.ppo.batch_size)]
        rollouts = steps.collect(policy, self.tokenizer, batch, self.ppo)
        times["time/rollout_seconds"] = time.time() - t
        t = time.time()
        scores = steps.score(rollouts, self.reward_fn, self.ppo)
        times["time/score_seconds"] = time.time() - t
        adv, returns, stats = steps.advantages(rollouts, scores, self.kl_ctl.value, self.ppo)
        t = time.time()
        optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=self.ppo.learning_rate)
        stats.update(steps.update(policy, optimizer, rollouts, adv, returns, self.ppo))
        times["time/update_seconds"] = time.time() - t
        self.kl_ctl.update(stats["objective/kl"], self.ppo.batch_size)
        t = time.time()
        after = self._evaluate(policy, None, held)
        times["time/eval_seconds"] += time.time() - t
        numbers = {**stats, **times, **{f"{k}_current": v for k, v in before.items() if k.startswith("eval/")},
                   **{k: v for k, v in after.items() if k.startswith("eval/")}}
        passed, reason = gate(after, before, self.config.kl_budget)
        if not passed:
            return RoundResult("rejected", reason=reason, metrics=numbers)
        version = self.registry.publish(policy.save, base_model=self.base_model, parent=current,
                                        metrics={k: v for k, v in numbers.items() if math.isfinite(v)})
        self.registry.activate(version)
        self.registry.prune(self.config.keep_versions)
        self._remember(version, held, after)
        return RoundResult("published", version=version, reason=reason, metrics=numbers)

    def _gate_prompts(self, held: list[str]) -> list[str]:
        """The gate's prompts: held-out ones as they are first seen, frozen once there are eval_prompts of them."""
        want = self.config.eval_prompts
        for p in held:
            if len(self.eval_prompts) >= want:
                break
            if p not in self.eval_prompts:
                self.eval_prompts.append(p)
        return list(self.eval_prompts)

    def _evaluate(self, policy: PolicyWithValue, version: str | None, held: list[str]) -> dict[str, Any]:
        """Evaluate on held-out prompts; a version evaluated before on them is only re-scored, not re-sampled."""
        key = (version, tuple(held))
        if version is not None and key in self._eval_cache:
            texts, kl = self._eval_cache[key]
            prompts = [p for p in held for _ in range(self.config.eval_samples_per_prompt)]
            return steps.score_evaluation(prompts, texts, kl, self.reward_fn)
        result = steps.evaluate(policy, self.tokenizer, held, self.reward_fn, self.ppo, self.config.eval_seed,
                                self.config.eval_samples_per_prompt)
        if version is not None:
            self._remember(version, held, result)
        return result

    def _remember(self, version: str, held: list[str], result: dict[str, Any]) -> None:
        self._eval_cache[(version, tuple(held))] = (result["texts"], result["eval/kl"])
        while len(self._eval_cache) > 4:  # only the latest few versions can be CURRENT again soon
            self._eval_cache.pop(next(iter(self._eval_cache)))

    def due(self, last_round_at: float, now: float | None = None) -> bool:
        """A background round is due: enough new feedback since the last round, or the interval passed."""
        s = self.config
        if s.round_min_feedback and self.store.count_feedback() - self.feedback_at_last_round >= s.round_min_feedback:
            return True
        now = time.time() if now is None else now
        return bool(s.round_interval_seconds) and now - last_round_at >= s.round_interval_seconds


def load_base_model(path: Path, device: str = "cpu") -> Callable[[], tuple[Any, Any]]:
    """A loader of fresh fp32 copies of the base model (training needs its own, unshared weights)."""
    from rlhf_online.models.provision import load_model

    return lambda: load_model(path, device=device)
