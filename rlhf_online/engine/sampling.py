"""Per-row sampling: each row of a batch has its own temperature, top-k, top-p and random stream."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_online.engine.request import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator, seeded for reproducible rows or from the OS otherwise."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]) -> list[int]:
    """Pick one token per row of logits [B, V] under that row's params."""
    logits = logits.float()
    out = logits.argmax(dim=-1).tolist()  # greedy rows keep this
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    idx = torch.tensor(rows)
    temps = torch.tensor([params[i].temperature for i in rows]).unsqueeze(1)
    x = logits.index_select(0, idx) / temps  # [R, V]
    top_k = [params[i].top_k for i in rows]
    top_p = [params[i].top_p for i in rows]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        x = _filter_top_k_top_p(x, top_k, top_p)
    # Inverse-CDF sampling: one batched cumsum, then one uniform draw per row from that row's own
    # generator (so a seeded row is reproducible whatever else shares the batch). float64 keeps the
    # CDF exact enough over a 49k vocabulary; this is ~10x faster than a multinomial call per row.
    cdf = torch.softmax(x.double(), dim=-1).cumsum(dim=-1)  # [R, V]
    u = torch.cat([torch.rand(1, generator=generators[i], dtype=torch.float64) for i in rows])
    picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1).clamp(max=x.shape[-1] - 1)
    for r, i in enumerate(rows):
        out[i] = int(picked[r])
    return out


def _filter_top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus (top-p) set with -inf."""
    sorted_x, order = torch.sort(x, dim=-1, descending=True)  # [R, V]
    vocab = x.shape[-1]
    ranks = torch.arange(vocab).unsqueeze(0)
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k]).unsqueeze(1)
    drop = ranks >= k
    probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
    # Keep a token while the mass *before* it is below top_p, so the first token always survives.
    before = probs.cumsum(dim=-1) - probs
    drop |= before >= torch.tensor(top_p).unsqueeze(1)
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
