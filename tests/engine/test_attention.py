"""The decode-step attention for half-precision CPU models against SDPA and a float64 reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

from rlhf_online.engine import attention

PROMPTS = ["Hello there.", "Tell me a long story about a dragon who lived in the mountains.", "Why?",
           "Write a haiku about tea and biscuits on a rainy afternoon in the garden."]


def _inputs(batch: int = 6, heads: int = 9, kv_heads: int = 3, length: int = 40, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, h, n, 64, generator=g).to(dtype)
               for h, n in ((heads, 1), (kv_heads, length), (kv_heads, length)))
    mask = torch.ones(batch, 1, 1, length + 3, dtype=torch.bool)  # longer than the cache, as transformers may pass
    for row in range(batch):
        mask[row, :, :, : 2 * row] = False  # left padding of different lengths
    return q, k, v, mask


class _Module(torch.nn.Module):
    num_key_value_groups = 3


def test_decode_attention_is_closer_to_float64_than_bf16_sdpa_with_grouped_heads_and_padding():
    q, k, v, mask = _inputs()
    out, weights = attention.decode_attention(_Module().eval(), q, k, v, mask)
    assert weights is None and out.shape == (6, 1, 9, 64) and out.dtype == torch.bfloat16  # [B, Q, H, D]
    kr, vr, m = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), mask[..., :40]
    reference = sdpa(q.double(), kr.double(), vr.double(), attn_mask=m).transpose(1, 2)
    bf16 = sdpa(q, kr, vr, attn_mask=m).transpose(1, 2)
    ours_err = (out.double() - reference).abs().max().item()
    assert ours_err <= (bf16.double() - reference).abs().max().item() + 1e-3
    assert ours_err < 0.01


def test_decode_attention_leaves_prefill_training_and_fp32_to_sdpa(monkeypatch):
    calls = []
    import transformers.integrations.sdpa_attention as sdpa_module

    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", lambda *a, **kw: calls.append(1) or ("sdpa", None))
    q, k, v, mask = _inputs()
    module = _Module()
    assert attention.decode_attention(module.eval(), q.float(), k.float(), v.float(), mask)[0] == "sdpa"
    assert attention.decode_attention(module.train(), q, k, v, mask)[0] == "sdpa"
    prefill = torch.cat([q, q], dim=2)  # two query positions
    assert attention.decode_attention(module.eval(), prefill, k, v, None)[0] == "sdpa"
    assert len(calls) == 3


def test_only_a_half_precision_cpu_model_is_switched(tiny):
    fp32 = copy.deepcopy(tiny[0])
    assert not attention.use_for_decoding(fp32) and fp32.config._attn_implementation == "sdpa"
    bf16 = copy.deepcopy(tiny[0]).to(torch.bfloat16)
    assert attention.use_for_decoding(bf16) and bf16.config._attn_implementation == attention.NAME


def _decode_step_logits(model, tok) -> torch.Tensor:
    """Logits [B, V] of one decode step after a left-padded prefill of PROMPTS (the engine's shapes)."""
    from transformers import DynamicCache

    enc = tok([tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p in PROMPTS], return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    cache = DynamicCache()
    with torch.no_grad():
        first = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                      past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(first)], dim=1)
        return model(input_ids=first, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                     past_key_values=cache, use_cache=True).logits[:, -1].double()


def test_a_bf16_decode_step_is_as_close_to_fp32_as_bf16_sdpa(tiny):
    model, tok = tiny
    reference = _decode_step_logits(model, tok)
    plain = copy.deepcopy(model).to(torch.bfloat16)
    switched = copy.deepcopy(plain)
    assert attention.use_for_decoding(switched)
    err_sdpa = (_decode_step_logits(plain, tok) - reference).abs().max().item()
    err_ours = (_decode_step_logits(switched, tok) - reference).abs().max().item()
    assert err_ours <= 1.25 * err_sdpa + 1e-3, (err_ours, err_sdpa)


@pytest.mark.parametrize("q_len, kv_length, padded, kv_offset", [
    (1, 9, True, 0), (1, 9, False, 0), (5, 5, True, 0), (5, 5, False, 0), (3, 9, True, 0), (1, 9, None, 0),
    (5, 5, None, 0), (2, 6, True, 3)])
def test_causal_padding_masks_are_the_ones_transformers_builds(q_len, kv_length, padded, kv_offset):
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    # longer than the keys, as generate may pass; None: no mask at all
    attention_mask = None if padded is None else torch.ones(3, kv_offset + kv_length + 2, dtype=torch.long)
    if padded:
        attention_mask[1, :2] = 0  # left padding of different lengths
        attention_mask[2, :4] = 0
    cache_position = torch.arange(kv_offset + kv_length - q_len, kv_offset + kv_length)
    args = dict(batch_size=3, cache_position=cache_position, kv_length=kv_length, kv_offset=kv_offset,
                mask_function=causal_mask_function, attention_mask=attention_mask)
    ours, theirs = attention.causal_padding_mask(**args), sdpa_mask(**args)
    if theirs is None:
        assert ours is None
    else:
        assert ours.dtype == torch.bool and torch.equal(ours, theirs)
    without_skip = attention.causal_padding_mask(**args, allow_is_causal_skip=False)
    assert torch.equal(without_skip, sdpa_mask(**args, allow_is_causal_skip=False))


def test_other_mask_functions_go_to_transformers(monkeypatch):
    import transformers.masking_utils as masking

    calls = []
    monkeypatch.setattr(masking, "sdpa_mask", lambda **kw: calls.append(kw) or "theirs")
    window = masking.sliding_window_causal_mask_function(4)
    assert attention.causal_padding_mask(batch_size=1, cache_position=torch.arange(3), kv_length=3,
                                         mask_function=window) == "theirs"
    assert calls and calls[0]["mask_function"] is window
