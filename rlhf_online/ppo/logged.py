"""Rounds from the completion log: what the served version already sampled for its users, re-read token for token.

A logged completion is an exact sample of the policy a round trains (the served version, which the
round warm-starts from) when it was drawn from that policy's own distribution at the rollouts'
temperature. So a round accepts a completion only if:

- it was served by the version the round starts from (`policy_version`);
- its temperature equals PPOConfig.temperature, with top_p 1 and top_k 0: truncated sampling
  draws from a different distribution than the one whose log-probs PPO's ratio uses;
- it has no stop strings: a stop string cuts the reply where the policy's own EOS did not, and the
  log keeps the tokens past the cut, so the recorded sample is not the text the user saw;
- it ended with EOS or at its length limit, and its prompt and reply token ids were logged
  (completions logged before schema migration 2 have none): re-tokenizing the text can split or
  merge tokens differently from what was sampled.

The served replica may run the model in bf16 while the trainer runs it in fp32: PPO's "old"
log-probs are recomputed here by the trainer's copy, so the ratio starts at exactly 1 and the
samples are off by the rounding between the two dtypes only.

No user fills more than `logged_max_user_share` of a batch: one user (a tenant's end user, with API
keys; anonymous requests of one tenant count as one user) sending most of the traffic, and rating
it, would otherwise be most of what a round learns from. Completions served without a key are not
capped: their user_id is whatever the client wrote, so there is no identity to cap by.

Held-out membership follows the prompt (data.split, the same rule as the reward model's), so the
gate can judge a candidate on held-out traffic the round never trained on.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from rlhf_online.data.split import is_heldout, prompt_key
from rlhf_online.ppo import core
from rlhf_online.ppo.config import PPOConfig, TrainerConfig
from rlhf_online.ppo.steps import Sample
from rlhf_online.store import CompletionRecord, Store


@dataclass
class LoggedBatch:
    """On-policy logged completions of one version: training samples, held-out samples, what was left out and why."""

    train: list[Sample]
    heldout: list[Sample]
    left_out: Counter


def why_not_on_policy(c: CompletionRecord, ppo: PPOConfig, cfg: TrainerConfig) -> str:
    """"" when the completion is an exact sample of its version's policy that a round can train on, else why not."""
    p = c.params
    if not c.token_ids or not c.prompt_token_ids:
        return "no token ids logged"
    if abs(float(p.get("temperature", -1.0)) - ppo.temperature) > 1e-6:
        return "temperature"
    if float(p.get("top_p", 1.0)) != 1.0 or int(p.get("top_k", 0)) != 0:
        return "truncated sampling"
    if p.get("stop") or c.finish_reason not in ("eos", "length"):
        return "stop strings"
    if len(c.prompt_token_ids) > cfg.max_logged_prompt_tokens or len(c.token_ids) > cfg.max_logged_response_tokens:
        return "too long"
    return ""


def to_sample(c: CompletionRecord) -> Sample:
    """A logged completion as a sample: its exact tokens, its text as the user got it, its id for the reward."""
    # The reward model reads a chat's last user message as its prompt.
    prompt = c.prompt or next((content for role, content in reversed(c.messages) if role == "user"), "")
    return Sample(prompt=prompt, prompt_ids=tuple(c.prompt_token_ids), response_ids=tuple(c.token_ids),
                  ended=c.finish_reason == "eos", text=c.text, completion_id=c.completion_id)


def user_of(c: CompletionRecord) -> tuple[str, str]:
    """Whose completion this is, for the per-user cap: (tenant, user_id); one served without a key is its own."""
    # Without a key the user_id is whatever the client wrote: nothing to cap by (and the demo's batches stay whole).
    return (c.tenant, c.user_id) if c.tenant else ("", c.completion_id)


def read(store: Store, version: str, ppo: PPOConfig, cfg: TrainerConfig, heldout_percent: int) -> LoggedBatch:
    """The newest on-policy completions `version` served: up to logged_batch_size to train on, and held-out ones."""
    batch = LoggedBatch([], [], Counter())
    per_user = max(1, math.ceil(cfg.logged_max_user_share * cfg.logged_batch_size))
    taken: Counter = Counter()
    # Read past the batch size: completions left out (off-policy, or over a user's share) make room for others.
    for c in store.served_completions(version, limit=4 * cfg.logged_batch_size):
        if why := why_not_on_policy(c, ppo, cfg):
            batch.left_out[why] += 1
        elif taken[user_of(c)] >= per_user:
            batch.left_out["user share"] += 1
        elif is_heldout(prompt_key(c), heldout_percent):
            if len(batch.heldout) < cfg.logged_batch_size // 2:
                batch.heldout.append(to_sample(c))
                taken[user_of(c)] += 1
        elif len(batch.train) < cfg.logged_batch_size:
            batch.train.append(to_sample(c))
            taken[user_of(c)] += 1
    return batch


@dataclass
class TrafficVerdict:
    """What the held-out traffic of the served version says about a candidate (importance-weighted)."""

    reward_current: float  # mean reward of the served version's held-out replies
    reward_candidate: float  # self-normalised importance-sampling estimate of the candidate's mean reward
    diff_se: float  # bootstrap standard error of the difference
    kl_current: float  # mean sequence KL of the served version to the reference on those replies
    kl_candidate: float  # importance-weighted estimate of the candidate's sequence KL to the reference
    kl_se: float  # bootstrap standard error of kl_candidate
    ess_share: float  # effective sample size of the importance weights / number of replies
    samples: int


def judge_on_traffic(current_logprobs: torch.Tensor, candidate_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                     scores: torch.Tensor, boot: int = 200, seed: int = 0) -> TrafficVerdict:
    """Off-policy evaluation of a candidate on replies the served version sampled ([B, T] masked log-probs, [B] scores).

    The candidate's expected reward is E_current[w r] with w = pi_candidate(y|x) / pi_current(y|x),
    estimated self-normalised (sum w r / sum w: bounded by the rewards, small bias, far lower
    variance); its KL to the reference is estimated the same way (k3 per token). The standard error of the
    difference comes from a bootstrap over the replies, so the gate can tell a drop from noise
    without sampling a single new reply.
    """
    log_w = (candidate_logprobs - current_logprobs).sum(1).double()
    # k3 per token (>= 0; padding gives 0): an importance-weighted sum of k1 can come out negative
    seq_kl_current = core.kl_per_token(current_logprobs, ref_logprobs, "k3").sum(1).double()
    seq_kl_candidate = core.kl_per_token(candidate_logprobs, ref_logprobs, "k3").sum(1).double()
    r = scores.double()

    def estimate(idx: torch.Tensor) -> tuple[float, float, float]:
        """(candidate's reward, served version's reward, candidate's KL) on the replies `idx`."""
        w = torch.softmax(log_w[idx], 0)
        return float((w * r[idx]).sum()), float(r[idx].mean()), float((w * seq_kl_candidate[idx]).sum())

    n = len(r)
    w = torch.softmax(log_w, 0)
    after, before, kl = estimate(torch.arange(n))
    g = torch.Generator().manual_seed(seed)
    boots = torch.tensor([estimate(torch.randint(n, (n,), generator=g)) for _ in range(boot)],
                         dtype=torch.float64)  # [boot, 3]
    return TrafficVerdict(reward_current=before, reward_candidate=after, diff_se=float((boots[:, 0] - boots[:, 1]).std()),
                          kl_current=float(seq_kl_current.mean()), kl_candidate=kl, kl_se=float(boots[:, 2].std()),
                          ess_share=float(1.0 / (w ** 2).sum()) / n, samples=n)
