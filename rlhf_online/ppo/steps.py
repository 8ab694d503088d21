"""The steps of a PPO round, each a function: collect -> score -> advantages -> update -> evaluate.

Sequences are [query | response]: queries left-padded to Lq, responses right-padded to T after
their EOS. Logits at position i predict token i + 1, so the response's log-probs and values are
read from positions Lq - 1 .. Lq + T - 2.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from rlhf_online.engine.batch import growing
from rlhf_online.engine.sampling import inverse_cdf
from rlhf_online.models.chat import chat_ids
from rlhf_online.ppo import core
from rlhf_online.ppo.config import PPOConfig
from rlhf_online.ppo.distributed import SINGLE, Ranks
from rlhf_online.ppo.policy import PolicyWithValue, names_own_cache

# reward_fn(prompts, texts, completion_ids) -> one score per item; a non-empty completion id names the logged
# completion, whose users' ratings the Reward service counts in (services.trainer.reward_client).
RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], list[float]]


@dataclass(frozen=True)
class Sample:
    """One prompt and one response sampled for it, as the exact token ids (a rollout or a logged completion)."""

    prompt: str
    prompt_ids: tuple[int, ...]  # chat template applied
    response_ids: tuple[int, ...]  # EOS included when it ended there
    ended: bool  # the response ended with EOS (not cut at the length limit)
    text: str
    completion_id: str = ""  # the logged completion it was read from ("" = the trainer's own rollout)


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
    completion_ids: list[str] = field(default_factory=list)  # per row, "" for the trainer's own rollouts

    def prompt_keys(self) -> list[tuple[int, ...]]:
        """Per row, the prompt's token ids as the policy saw them: rows with equal keys answer the same prompt."""
        return [tuple(q[m.bool()].tolist()) for q, m in zip(self.query, self.query_mask, strict=True)]

    @property
    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[query | response] ids and attention mask."""
        return torch.cat([self.query, self.response], 1), torch.cat([self.query_mask, self.mask.long()], 1)


def encode_queries(tokenizer: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts through the chat template (as the serving engine does), left-padded."""
    ids = [chat_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    return _left_padded(ids, tokenizer.pad_token_id)


def _left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, max len] ids left-padded with `pad_id`, and the mask of real tokens."""
    width = max(len(x) for x in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, x in enumerate(rows):
        ids[i, width - len(x):] = torch.tensor(list(x), dtype=torch.long)
        mask[i, width - len(x):] = 1
    return ids, mask


def response_mask(response: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, T] covering tokens up to and including the first EOS, ended [B])."""
    is_eos = response == eos_id
    ended = is_eos.any(1)
    first = torch.where(ended, is_eos.float().argmax(1), torch.full_like(ended, response.shape[1], dtype=torch.long))
    mask = (torch.arange(response.shape[1]).unsqueeze(0) <= first.unsqueeze(1)).float()
    return mask, ended


def _response_slices(policy: PolicyWithValue, rollout_ids: torch.Tensor, attn: torch.Tensor, t: int,
                     response: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [B, T] of the response tokens, values [B, T]) from one forward pass."""
    # Logits and values at positions lq - 1 .. lq + t - 2 (lq = query width) belong to the response's tokens:
    # the last t + 1 positions but the very last.
    logits, values = policy(rollout_ids, attn, keep=t + 1, skip_last=True)
    return core.logprobs_of(logits, response, temperature), values[:, :t]


def _reference_slices(policy: PolicyWithValue, rollout_ids: torch.Tensor, attn: torch.Tensor, t: int,
                      response: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs [B, T] of the response tokens under the frozen reference (the positions as in `_response_slices`)."""
    return core.logprobs_of(policy.reference_logits(rollout_ids, attn, keep=t + 1, skip_last=True), response,
                            temperature)


@torch.no_grad()
def sample(policy: PolicyWithValue, tokenizer: Any, prompts: Sequence[str], cfg: PPOConfig,
           seed: int | None = None) -> list[Sample]:
    """Sample one response per prompt from the policy (temperature cfg.temperature, no top-p/top-k)."""
    return _sample(policy, tokenizer, prompts, cfg, seed, with_logprobs=False)[0]


def sample_scored(policy: PolicyWithValue, tokenizer: Any, prompts: Sequence[str], cfg: PPOConfig,
                  seed: int | None = None) -> tuple[list[Sample], torch.Tensor]:
    """`sample`, and each sampled token's log-prob under the policy [B, T] (masked), read off the decode's logits.

    The scores the tokens were drawn from are the policy's already, so a second forward pass over
    the replies (as `measure` makes for training, where values are needed too) is not: for the
    gate's 24 replies that pass was a quarter of its time. Same precision as the passes: fp32
    logits (see PolicyWithValue.sampling) over the temperature, as `measure` reads them.
    """
    return _sample(policy, tokenizer, prompts, cfg, seed, with_logprobs=True)


def _sample(policy: PolicyWithValue, tokenizer: Any, prompts: Sequence[str], cfg: PPOConfig, seed: int | None,
            with_logprobs: bool) -> tuple[list[Sample], torch.Tensor]:
    policy.eval()
    query, query_mask = encode_queries(tokenizer, prompts)
    if seed is not None:
        torch.manual_seed(seed)
    sampler = _InverseCdfSampler(cfg.temperature, with_logprobs)
    with policy.sampling():
        # do_sample=False: the sampler has drawn each row's token already and left it the only finite score, so
        # generate's argmax takes it (generate's own sampling calls torch.multinomial, see _InverseCdfSampler).
        out = policy.model.generate(input_ids=query, attention_mask=query_mask, do_sample=False,
                                    max_new_tokens=cfg.response_length, **_decode_cache(policy.model),
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                    logits_processor=LogitsProcessorList([sampler]))
    response = out[:, query.shape[1]:]
    mask, ended = response_mask(response, tokenizer.eos_token_id)
    logprobs = sampler.result(response) * mask if with_logprobs else torch.zeros(0)
    samples = []
    for i, prompt in enumerate(prompts):
        ids = response[i, : int(mask[i].sum())].tolist()
        samples.append(Sample(prompt, tuple(query[i, query_mask[i].bool()].tolist()), tuple(ids), bool(ended[i]),
                              tokenizer.decode(ids, skip_special_tokens=True)))
    return samples, logprobs


def _decode_cache(model: Any) -> dict[str, DynamicCache]:
    """generate's `past_key_values`: the serving engine's cache layers, unless the model asks for another cache.

    A GrowingLayer writes each step's token into a buffer with room instead of torch.cat's copy of
    every layer: the same keys, so the same tokens, 4% of sampling at 8 x 32 (AMX Xeon). A model
    whose generation config names a cache implementation (sliding or hybrid caches) keeps its own:
    generate refuses both at once.
    """
    if names_own_cache(model):
        return {}
    return {"past_key_values": growing(DynamicCache(config=model.config))}


class _InverseCdfSampler(LogitsProcessor):
    """Draws each row's next token from softmax(scores / temperature), and keeps its log-prob if asked.

    generate's sampling calls torch.multinomial, which draws one exponential per vocabulary entry:
    11 ms of each ~200-ms step at 8 rows x 49k tokens (SmolLM2 fp32, 2 threads, profiled), 6% of a
    round's sampling. The serving engine's inverse CDF needs one uniform per row (from torch's global
    generator, so `seed` still fixes the draw). The returned scores are -inf but for the drawn token,
    which generate's greedy step then picks. With `record`, each step's log-softmax is held (one
    [B, V] at a time, not generate's B x T x V output_logits: 400 MB for the service's default gate)
    until the token drawn from it is known, at the next call or, for the last step, in the output.
    """

    def __init__(self, temperature: float, record: bool) -> None:
        self.temperature, self.record = temperature, record
        self.pending: torch.Tensor | None = None  # [B, V] log-probs of the step whose token is not yet in the ids
        self.picked: list[torch.Tensor] = []  # [B] per finished step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Record the previous step's token log-prob, draw this step's tokens; scores [B, V] -> one finite per row."""
        if self.pending is not None:
            self.picked.append(self.pending.gather(1, input_ids[:, -1:]).squeeze(1))
        logprobs = torch.log_softmax(scores.float() / self.temperature, dim=-1)  # [B, V]
        if self.record:
            self.pending = logprobs
        # [B] in [0, 1), drawn on the CPU (the same draws for a seed whatever the device), used where the scores are
        u = torch.rand(scores.shape[0], dtype=torch.float64).to(scores.device)
        token = inverse_cdf(logprobs.exp(), u)  # [B]
        return torch.full_like(scores, float("-inf")).scatter_(1, token.unsqueeze(1), 0.0)

    def result(self, response: torch.Tensor) -> torch.Tensor:
        """[B, T] log-probs of the generated tokens `response` [B, T]."""
        if self.pending is not None:
            self.picked.append(self.pending.gather(1, response[:, -1:]).squeeze(1))
            self.pending = None
        return torch.stack(self.picked, 1)


def _pack(samples: Sequence[Sample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query [B, Lq] left-padded, its mask, response [B, T] right-padded, its float mask) of samples."""
    query, query_mask = _left_padded([s.prompt_ids for s in samples], pad_id)
    t = max(len(s.response_ids) for s in samples)
    response = torch.full((len(samples), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), t)
    for i, s in enumerate(samples):
        response[i, : len(s.response_ids)] = torch.tensor(s.response_ids, dtype=torch.long)
        mask[i, : len(s.response_ids)] = 1.0
    return query, query_mask, response, mask


@torch.no_grad()
def reference_logprobs(policy: PolicyWithValue, samples: Sequence[Sample], pad_id: int, cfg: PPOConfig
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [B, T] of the samples' responses under the frozen reference (masked), the response mask [B, T])."""
    query, query_mask, response, mask = _pack(samples, pad_id)
    ids, attn = torch.cat([query, response], 1), torch.cat([query_mask, mask.long()], 1)
    t = response.shape[1]
    parts = [_reference_slices(policy, ids[rows], attn[rows], t, response[rows], cfg.temperature)
             for rows in torch.arange(len(samples)).split(cfg.local_rollout_forward_batch_size)]
    return torch.cat(parts).float() * mask, mask


@torch.no_grad()
def measure(policy: PolicyWithValue, samples: Sequence[Sample], pad_id: int, cfg: PPOConfig,
            ranks: Ranks = SINGLE) -> Rollouts:
    """Policy and reference log-probs and values of given samples: forward passes only, no generation.

    Rows go through the model cfg.local_rollout_forward_batch_size at a time: a whole round's batch
    at once would hold [B, L, vocab] logits (gigabytes at a few hundred rows). With several ranks
    each computes its share of the rows and every rank gets them all back (ppo.distributed).
    """
    policy.eval()
    query, query_mask, response, mask = _pack(samples, pad_id)
    t = response.shape[1]
    ids, attn = torch.cat([query, response], 1), torch.cat([query_mask, mask.long()], 1)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = [(torch.zeros(0, t),) * 3]  # a rank may get none
    for rows in ranks.share(torch.arange(len(samples))).split(cfg.local_rollout_forward_batch_size):
        logprobs, values = _response_slices(policy, ids[rows], attn[rows], t, response[rows], cfg.temperature)
        ref = _reference_slices(policy, ids[rows], attn[rows], t, response[rows], cfg.temperature)
        parts.append((logprobs, ref, values))
    logprobs, ref_logprobs, values = (ranks.gather_rows(torch.cat(x).float(), len(samples))
                                      for x in zip(*parts, strict=True))
    return Rollouts([s.prompt for s in samples], query, query_mask, response, mask, [s.text for s in samples],
                    torch.tensor([s.ended for s in samples]), logprobs * mask, ref_logprobs * mask, values * mask,
                    [s.completion_id for s in samples])


def collect(policy: PolicyWithValue, tokenizer: Any, prompts: Sequence[str], cfg: PPOConfig,
            seed: int | None = None) -> Rollouts:
    """Sample one response per prompt and record policy / reference log-probs and values."""
    return measure(policy, sample(policy, tokenizer, prompts, cfg, seed), tokenizer.pad_token_id, cfg)


def score(rollouts: Rollouts, reward_fn: RewardFn, cfg: PPOConfig) -> torch.Tensor:
    """Reward-model scores [B] of the responses; a response without EOS pays missing_eos_penalty."""
    ids = rollouts.completion_ids or [""] * len(rollouts.texts)
    scores = torch.tensor(reward_fn(rollouts.prompts, rollouts.texts, ids), dtype=torch.float)
    return scores - cfg.missing_eos_penalty * (~rollouts.ended).float()


def sequence_kl(rollouts: Rollouts) -> float:
    """Mean KL of the responses to the reference, nats per response: k3 per token, as the gate reads the budget."""
    return float((core.kl_per_token(rollouts.logprobs, rollouts.ref_logprobs, "k3") * rollouts.mask).sum(1).mean())


def advantages(rollouts: Rollouts, scores: torch.Tensor, kl_coef: float, cfg: PPOConfig
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Per-token rewards (-beta KL, score at the end) -> GAE -> whitened advantages, and returns."""
    kl = core.kl_per_token(rollouts.logprobs, rollouts.ref_logprobs) * rollouts.mask
    raw_scores, keys = scores, rollouts.prompt_keys()
    if cfg.prompt_baseline:
        scores = core.leave_one_out(scores, keys)
    rewards = core.per_token_rewards(scores, kl, rollouts.mask, kl_coef)
    if cfg.whiten_rewards:
        rewards = core.whiten(rewards, rollouts.mask, shift_mean=False)
    adv, returns = core.gae(rewards, rollouts.values, rollouts.mask, cfg.gamma, cfg.lam)
    adv = core.whiten(adv, rollouts.mask)
    seq_kl = kl.sum(1)
    non_score = (-kl_coef * kl).sum(1)
    siblings = Counter(keys)
    stats = {"objective/kl": float(seq_kl.mean()), "objective/scores": float(raw_scores.mean()),
             "objective/non_score_reward": float(non_score.mean()),
             "objective/rlhf_reward": float((raw_scores + non_score).mean()), "objective/kl_coef": kl_coef,
             # share of rows compared with a sibling reply to the same prompt (0 when prompt_baseline is off)
             "objective/baselined_share": float(cfg.prompt_baseline) * sum(siblings[k] > 1 for k in keys) / len(keys),
             "val/mean": float(core.masked_mean(rollouts.values, rollouts.mask)),
             "objective/response_length": float(rollouts.mask.sum(1).mean())}
    return adv, returns, stats


def update(policy: PolicyWithValue, optimizer: torch.optim.Optimizer, rollouts: Rollouts, adv: torch.Tensor,
           returns: torch.Tensor, cfg: PPOConfig, ranks: Ranks = SINGLE) -> dict[str, float]:
    """num_ppo_epochs passes of minibatch PPO; stops early once the policy moved past early_stop_approxkl.

    Each minibatch (batch / num_mini_batches rows) is one optimizer step, its gradient accumulated
    over forward/backward passes of cfg.per_device_train_batch_size rows, so a batch of a few hundred
    logged samples fits in memory. With several ranks each takes its share of every minibatch's rows
    and the gradients are summed over the ranks before the step (ppo.distributed); the stats are
    this rank's micro-batches'.
    """
    policy.train()
    ids, attn = rollouts.sequences
    t = rollouts.response.shape[1]
    batch = ids.shape[0]
    size = math.ceil(batch / min(cfg.num_mini_batches, batch))
    params = policy.trainable_parameters()
    # One permutation on every rank (rank 0's seed): the ranks split the same minibatches.
    order = torch.Generator().manual_seed(ranks.broadcast(int(torch.randint(2**62, ()))))
    history: dict[str, list[float]] = {}
    epochs_run = 0
    for _ in range(cfg.num_ppo_epochs):
        epochs_run += 1
        epoch_kl = torch.zeros(2, dtype=torch.float64)  # [sum of approx. KL x tokens, tokens], over all ranks
        for minibatch in torch.randperm(batch, generator=order).split(size):
            optimizer.zero_grad()
            tokens = rollouts.mask[minibatch].sum()
            for idx in ranks.share(minibatch).split(cfg.per_device_train_batch_size):
                logprobs, values = _response_slices(policy, ids[idx], attn[idx], t, rollouts.response[idx],
                                                    cfg.temperature)
                m = rollouts.mask[idx]
                pg_loss, pg_stats = core.policy_loss(logprobs, rollouts.logprobs[idx], adv[idx], m, cfg.cliprange)
                vf_loss, vf_stats = core.value_loss(values, rollouts.values[idx], returns[idx], m,
                                                    cfg.cliprange_value)
                loss = pg_loss + cfg.vf_coef * vf_loss
                # The losses are token means over the micro-batch; weighted by its share of the minibatch's
                # tokens they add up to the minibatch's token mean, however its rows are split into
                # micro-batches and ranks (the same gradient on 1 rank or N).
                (loss * m.sum() / tokens).backward()
                for k, v in {**pg_stats, **vf_stats, "loss/policy_avg": pg_loss.item(),
                             "loss/value_avg": vf_loss.item(), "loss/total": loss.item()}.items():
                    history.setdefault(k, []).append(v)
                epoch_kl += torch.tensor([pg_stats["policy/approxkl"] * float(m.sum()), float(m.sum())],
                                         dtype=torch.float64)
            _sum_gradients(params, ranks)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
        ranks.sum_(epoch_kl)
        if cfg.early_stop_approxkl and epoch_kl[0] / epoch_kl[1] > cfg.early_stop_approxkl:
            break
    policy.eval()
    stats = {k: sum(v) / len(v) for k, v in history.items()}
    stats["policy/epochs"] = float(epochs_run)
    return stats


def _sum_gradients(params: list[torch.nn.Parameter], ranks: Ranks) -> None:
    """Sum the gradients over the ranks in one flat buffer (a rank without rows in a minibatch adds zeros)."""
    if ranks.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    ranks.sum_(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


@torch.no_grad()
def response_logprobs(policy: PolicyWithValue, rollouts: Rollouts, cfg: PPOConfig) -> torch.Tensor:
    """[B, T] log-probs of the rollouts' responses under the policy as it is now (masked)."""
    policy.eval()
    ids, attn = rollouts.sequences
    t = rollouts.response.shape[1]
    parts = [_response_slices(policy, ids[rows], attn[rows], t, rollouts.response[rows], cfg.temperature)[0]
             for rows in torch.arange(ids.shape[0]).split(cfg.local_rollout_forward_batch_size)]
    return torch.cat(parts) * rollouts.mask


@torch.no_grad()
def evaluate(policy: PolicyWithValue, tokenizer: Any, prompts: Sequence[str], reward_fn: RewardFn, cfg: PPOConfig,
             seed: int, samples_per_prompt: int = 1) -> dict[str, Any]:
    """Rewards and mean sequence KL to the reference on held-out prompts, sampled with a fixed seed.

    The same seed for the current policy and a candidate gives paired samples (common random
    numbers), so their difference is far less noisy than two independent draws.
    """
    batch = [p for p in prompts for _ in range(samples_per_prompt)]
    samples, logprobs = sample_scored(policy, tokenizer, batch, cfg, seed=seed)
    ref_logprobs, mask = reference_logprobs(policy, samples, tokenizer.pad_token_id, cfg)
    # k3: never negative and lower variance than k1 on a dozen samples, so a budget check reads it as a KL
    seq_kl = (core.kl_per_token(logprobs[:, : mask.shape[1]], ref_logprobs, "k3") * mask).sum(1).double()  # [B]
    # Its standard error, for a budget check near the edge that reads a mean of a couple of dozen replies:
    # over the prompts' means, since replies to one prompt share its KL and are not independent draws.
    per_prompt = seq_kl.view(len(prompts), samples_per_prompt).mean(1)  # batch is prompt-major
    kl_se = float(per_prompt.std() / math.sqrt(len(per_prompt))) if len(per_prompt) > 1 else math.nan
    return score_evaluation(batch, [s.text for s in samples], float(seq_kl.mean()), reward_fn, kl_se)


def score_evaluation(prompts: Sequence[str], texts: Sequence[str], kl: float, reward_fn: RewardFn,
                     kl_se: float = math.nan) -> dict[str, Any]:
    """The evaluation numbers of sampled replies: rewards by `reward_fn`, their mean, the KL (± its SE), finiteness."""
    rewards = [float(x) for x in reward_fn(list(prompts), list(texts), [""] * len(texts))]
    return {"eval/reward": sum(rewards) / len(rewards), "eval/kl": kl, "eval/kl_se": kl_se,
            "eval/finite": float(all(math.isfinite(x) for x in [*rewards, kl])), "rewards": rewards,
            "prompts": list(prompts), "texts": list(texts)}
