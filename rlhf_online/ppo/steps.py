"""The steps of a PPO round, each a function: collect -> score -> advantages -> update -> evaluate.

Sequences are [query | response]: queries left-padded to Lq, responses right-padded to T after
their EOS. Logits at position i predict token i + 1, so the response's log-probs and values are
read from positions Lq - 1 .. Lq + T - 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_online.ppo import core
from rlhf_online.ppo.config import PPOConfig
from rlhf_online.ppo.policy import PolicyWithValue

RewardFn = Callable[[Sequence[str], Sequence[str]], list[float]]


@dataclass
class Rollouts:
    """A batch of sampled responses and what the policy, the reference and the value head said about them."""

    prompts: list[str]
    query: torch.Tensor  # [B, Lq] left-padded
    query_mask: torch.Tensor  # [B, Lq]
    response: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] float: 1 up to and including EOS
    texts: list[str]
    ended: torch.Tensor  # [B] bool: the response contains EOS
    logprobs: torch.Tensor  # [B, T] under the policy that sampled them
    ref_logprobs: torch.Tensor  # [B, T] under the reference
    values: torch.Tensor  # [B, T]

    @property
    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[query | response] ids and attention mask."""
        return torch.cat([self.query, self.response], 1), torch.cat([self.query_mask, self.mask.long()], 1)


def encode_queries(tokenizer: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts through the chat template (as the serving engine does), left-padded."""
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    width = max(len(x) for x in ids)
    query = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, x in enumerate(ids):
        query[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    return query, mask


def response_mask(response: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, T] covering tokens up to and including the first EOS, ended [B])."""
    is_eos = response == eos_id
    ended = is_eos.any(1)
    first = torch.where(ended, is_eos.float().argmax(1), torch.full_like(ended, response.shape[1], dtype=torch.long))
    mask = (torch.arange(response.shape[1]).unsqueeze(0) <= first.unsqueeze(1)).float()
    return mask, ended


def _response_slices(policy: PolicyWithValue, rollout_ids: torch.Tensor, attn: torch.Tensor, lq: int, t: int,
                     response: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [B, T] of the response tokens, values [B, T]) from one forward pass."""
    logits, values = policy(rollout_ids, attn)
    logits = logits[:, lq - 1: lq + t - 1] / temperature
    return core.logprobs_of(logits, response), values[:, lq - 1: lq + t - 1]


@torch.no_grad()
def collect(policy: PolicyWithValue, tokenizer: Any, prompts: Sequence[str], cfg: PPOConfig,
            seed: int | None = None) -> Rollouts:
    """Sample one response per prompt and record policy / reference log-probs and values."""
    policy.eval()
    query, query_mask = encode_queries(tokenizer, prompts)
    if seed is not None:
        torch.manual_seed(seed)
    out = policy.model.generate(input_ids=query, attention_mask=query_mask, do_sample=True,
                                temperature=cfg.temperature, top_k=0, top_p=1.0, max_new_tokens=cfg.response_length,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    lq = query.shape[1]
    response = out[:, lq:]
    mask, ended = response_mask(response, tokenizer.eos_token_id)
    response = torch.where(mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    ids, attn = torch.cat([query, response], 1), torch.cat([query_mask, mask.long()], 1)
    t = response.shape[1]
    logprobs, values = _response_slices(policy, ids, attn, lq, t, response, cfg.temperature)
    ref_logits = policy.reference_logits(ids, attn)[:, lq - 1: lq + t - 1] / cfg.temperature
    ref_logprobs = core.logprobs_of(ref_logits, response)
    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
    return Rollouts(list(prompts), query, query_mask, response, mask, texts, ended,
                    logprobs * mask, ref_logprobs * mask, values * mask)


def score(rollouts: Rollouts, reward_fn: RewardFn, cfg: PPOConfig) -> torch.Tensor:
    """Reward-model scores [B] of the responses; a response without EOS pays missing_eos_penalty."""
    scores = torch.tensor(reward_fn(rollouts.prompts, rollouts.texts), dtype=torch.float)
    return scores - cfg.missing_eos_penalty * (~rollouts.ended).float()


def advantages(rollouts: Rollouts, scores: torch.Tensor, kl_coef: float, cfg: PPOConfig
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Per-token rewards (-beta KL, score at the end) -> GAE -> whitened advantages, and returns."""
    kl = core.kl_per_token(rollouts.logprobs, rollouts.ref_logprobs) * rollouts.mask
    rewards = core.per_token_rewards(scores, kl, rollouts.mask, kl_coef)
    if cfg.whiten_rewards:
        rewards = core.whiten(rewards, rollouts.mask, shift_mean=False)
    adv, returns = core.gae(rewards, rollouts.values, rollouts.mask, cfg.gamma, cfg.lam)
    adv = core.whiten(adv, rollouts.mask)
    seq_kl = kl.sum(1)
    non_score = (-kl_coef * kl).sum(1)
    stats = {"objective/kl": float(seq_kl.mean()), "objective/scores": float(scores.mean()),
             "objective/non_score_reward": float(non_score.mean()),
             "objective/rlhf_reward": float((scores + non_score).mean()), "objective/kl_coef": kl_coef,
             "val/mean": float(core.masked_mean(rollouts.values, rollouts.mask)),
             "objective/response_length": float(rollouts.mask.sum(1).mean())}
    return adv, returns, stats


def update(policy: PolicyWithValue, optimizer: torch.optim.Optimizer, rollouts: Rollouts, adv: torch.Tensor,
           returns: torch.Tensor, cfg: PPOConfig) -> dict[str, float]:
    """num_ppo_epochs passes of minibatch PPO; stops early once the policy moved past early_stop_approxkl."""
    policy.train()
    ids, attn = rollouts.sequences
    lq, t = rollouts.query.shape[1], rollouts.response.shape[1]
    batch = ids.shape[0]
    size = math.ceil(batch / cfg.num_mini_batches)
    history: dict[str, list[float]] = {}
    epochs_run = 0
    for _ in range(cfg.num_ppo_epochs):
        epochs_run += 1
        epoch_kl = []
        for idx in torch.randperm(batch).split(size):
            logprobs, values = _response_slices(policy, ids[idx], attn[idx], lq, t, rollouts.response[idx],
                                                cfg.temperature)
            m = rollouts.mask[idx]
            pg_loss, pg_stats = core.policy_loss(logprobs, rollouts.logprobs[idx], adv[idx], m, cfg.cliprange)
            vf_loss, vf_stats = core.value_loss(values, rollouts.values[idx], returns[idx], m, cfg.cliprange_value)
            loss = pg_loss + cfg.vf_coef * vf_loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), cfg.max_grad_norm)
            optimizer.step()
            for k, v in {**pg_stats, **vf_stats, "loss/policy_avg": pg_loss.item(), "loss/value_avg": vf_loss.item(),
                         "loss/total": loss.item()}.items():
                history.setdefault(k, []).append(v)
            epoch_kl.append(pg_stats["policy/approxkl"])
        if cfg.early_stop_approxkl and sum(epoch_kl) / len(epoch_kl) > cfg.early_stop_approxkl:
            break
    policy.eval()
    stats = {k: sum(v) / len(v) for k, v in history.items()}
    stats["policy/epochs"] = float(epochs_run)
    return stats


@torch.no_grad()
def evaluate(policy: PolicyWithValue, tokenizer: Any, prompts: Sequence[str], reward_fn: RewardFn, cfg: PPOConfig,
             seed: int, samples_per_prompt: int = 1) -> dict[str, Any]:
    """Rewards and mean sequence KL to the reference on held-out prompts, sampled with a fixed seed.

    The same seed for the current policy and a candidate gives paired samples (common random
    numbers), so their difference is far less noisy than two independent draws.
    """
    batch = [p for p in prompts for _ in range(samples_per_prompt)]
    rollouts = collect(policy, tokenizer, batch, cfg, seed=seed)
    kl = float((core.kl_per_token(rollouts.logprobs, rollouts.ref_logprobs) * rollouts.mask).sum(1).mean())
    return score_evaluation(batch, rollouts.texts, kl, reward_fn)


def score_evaluation(prompts: Sequence[str], texts: Sequence[str], kl: float, reward_fn: RewardFn) -> dict[str, Any]:
    """The evaluation numbers of sampled replies: rewards by `reward_fn`, their mean, the KL, finiteness."""
    rewards = [float(x) for x in reward_fn(list(prompts), list(texts))]
    return {"eval/reward": sum(rewards) / len(rewards), "eval/kl": kl,
            "eval/finite": float(all(math.isfinite(x) for x in [*rewards, kl])), "rewards": rewards,
            "prompts": list(prompts), "texts": list(texts)}
