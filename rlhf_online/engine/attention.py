"""Decode-step attention and masks for half-precision passes on the CPU, registered as a transformers attention.

Profiled (`bench serving`, SmolLM2 in bf16, 32 rows): torch's CPU `scaled_dot_product_attention`
took 2.0 ms per layer for one new token against a 100-token cache — 29% of the step, more than
every projection together — because in bf16 with a mask it falls back to its unfused math path
with grouped heads repeated. One new token per row is two small matmuls: done here in fp32 on the
un-repeated cache (grouped query heads share their key/value head) it takes 0.45 ms, and is closer
to a float64 reference than the bf16 kernel (max error 0.002 vs 0.003). Everything else —
prefill, training, fp32 passes, GPUs — goes to transformers' own SDPA path unchanged.

Both implementations here build their masks without transformers' vmap (`causal_padding_mask`):
NAME, the serving engine's, for a bf16 model (`use_for_decoding`); SDPA_FAST_MASK, transformers'
own SDPA with only the mask changed (the same masks, so the same numbers bit for bit), for the
trainer's policy while it samples rollouts (`fast_masks`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

NAME = "rlhf_cpu_decode"
SDPA_FAST_MASK = "rlhf_sdpa"
HALF = (torch.bfloat16, torch.float16)


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention output [B, Q, H, D] of query [B, H, Q, D] over key/value [B, KV, T, D] (transformers' contract)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    if (q_len != 1 or query.device.type != "cpu" or query.dtype not in HALF or module.training or dropout
            or heads % kv_heads or kwargs.get("output_attentions") or kwargs.get("head_mask") is not None):
        # SDPA wants one dtype; an fp32 cache of a bf16 model (batch.GrowingLayer) holds bf16 values exactly
        key, value = key.to(query.dtype), value.to(query.dtype)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    # Query heads h = k * group + g all read key/value head k (repeat_kv's order): [B, KV, group, D].
    q = query.view(batch, kv_heads, group, dim).float()
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # [B, KV, group, T]
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :length]  # [B or 1, 1, 1, T]: broadcasts over heads
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask.float())
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value.float())  # [B, KV, group, D]
    return out.reshape(batch, 1, heads, dim).to(query.dtype), None


def causal_padding_mask(batch_size: int, cache_position: torch.Tensor, kv_length: int, kv_offset: int = 0,
                        mask_function: Any = None, attention_mask: torch.Tensor | None = None,
                        allow_is_causal_skip: bool = True, **kwargs: Any) -> torch.Tensor | None:
    """The boolean mask [B, 1, Q, T] SDPA gets for a causal model with left padding, without vmap.

    transformers builds it by vmapping a Python mask function over batch x query x key (its
    `sdpa_mask`): 3.7% of the trainer's sampling at 8 rows x 32 tokens, one call per step. A plain
    causal mask with padding is a comparison and an AND: `kv <= query position` and the 2D
    padding mask. Any other mask function (sliding windows, packed sequences) goes to `sdpa_mask`;
    None is the causal one, as transformers' default.
    """
    from transformers.masking_utils import (
        _ignore_causal_mask_sdpa,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )

    mask_function = mask_function or causal_mask_function
    if mask_function is not causal_mask_function or (attention_mask is not None and attention_mask.dim() != 2):
        return sdpa_mask(batch_size=batch_size, cache_position=cache_position, kv_length=kv_length,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         allow_is_causal_skip=allow_is_causal_skip, **kwargs)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
    if allow_is_causal_skip and _ignore_causal_mask_sdpa(padding, cache_position.shape[0], kv_length, kv_offset):
        return None  # as sdpa_mask: SDPA's own is_causal covers it
    kv = torch.arange(kv_length, device=cache_position.device) + kv_offset  # [T] absolute key positions
    mask = (kv.unsqueeze(0) <= cache_position.unsqueeze(1)).view(1, 1, -1, kv_length)  # [1, 1, Q, T]
    if padding is not None:
        mask = mask & padding[:, kv].bool().view(padding.shape[0], 1, 1, kv_length)
    return mask.expand(batch_size, 1, -1, -1)


def _register() -> None:
    """Make NAME and SDPA_FAST_MASK transformers attention implementations with these masks."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, decode_attention)
    AttentionInterface.register(SDPA_FAST_MASK, sdpa_attention_forward)
    for name in (NAME, SDPA_FAST_MASK):
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, causal_padding_mask)


def use_for_decoding(model: Any) -> bool:
    """Switch a half-precision CPU model that uses SDPA to this attention; True when switched."""
    param = next(model.parameters())
    config = model.config
    if param.device.type != "cpu" or param.dtype not in HALF or config._attn_implementation not in ("sdpa", NAME):
        return False
    _register()
    model.set_attn_implementation(NAME)
    return config._attn_implementation == NAME


@contextmanager
def fast_masks(model: Any) -> Iterator[bool]:
    """SDPA with `causal_padding_mask`'s masks for a model that uses SDPA, for a while (the trainer's sampling)."""
    previous = model.config._attn_implementation
    if previous != "sdpa":
        yield False
        return
    _register()
    model.set_attn_implementation(SDPA_FAST_MASK)
    try:
        yield True
    finally:
        model.set_attn_implementation(previous)
