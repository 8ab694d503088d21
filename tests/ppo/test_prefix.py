"""The shared prompt prefix: where `split` cuts a batch, and passes over the split equal passes over whole rows."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_online.ppo import prefix, steps
from rlhf_online.ppo.config import PPOConfig
from rlhf_online.ppo.policy import PolicyWithValue

PAD = 0


def _rows(*rows: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask of the given rows."""
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    return ids, (torch.arange(width) >= torch.tensor([width - len(r) for r in rows]).unsqueeze(1)).long()


def test_split_cuts_the_common_prefix_and_keeps_each_rows_padding():
    # rows of 6 and 4 tokens sharing [7, 8, 9]; the second row has two columns of left padding
    ids, mask = _rows([7, 8, 9, 1, 2, 3], [7, 8, 9, 4], width=6)
    shared = prefix.split(ids, mask, before=6, min_length=2)
    assert shared is not None
    assert shared.ids.tolist() == [7, 8, 9]
    assert shared.rest_ids.tolist() == [[1, 2, 3], [PAD, PAD, 4]]
    assert shared.rest_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    # each remainder token keeps the position it has in its whole row (pads take the prefix's length)
    assert shared.rest_positions.tolist() == [[3, 4, 5], [3, 3, 3]]


def test_split_drops_padding_every_row_has_and_stops_before_the_wanted_columns():
    ids, mask = _rows([7, 8, 9, 1], [7, 8, 9, 4], width=6)  # two all-padding columns
    shared = prefix.split(ids, mask, before=6, min_length=1)
    assert shared.ids.tolist() == [7, 8, 9]
    assert shared.rest_ids.tolist() == [[1], [4]]
    assert shared.rest_positions.tolist() == [[3], [3]]
    # hidden states wanted from column 4: the prefix must end before it in every row (columns 2 and 3 only)
    shared = prefix.split(ids, mask, before=4, min_length=1)
    assert shared.ids.tolist() == [7, 8]
    assert shared.rest_ids.tolist() == [[9, 1], [9, 4]]
    assert shared.rest_positions.tolist() == [[2, 3], [2, 3]]


@pytest.mark.parametrize("case", ["too short", "one row", "off", "no room"])
def test_split_declines(case):
    ids, mask = _rows([7, 8, 1, 2], [7, 8, 3, 4], width=4)
    kwargs = {"too short": dict(before=4, min_length=3), "off": dict(before=4, min_length=0),
              "no room": dict(before=1, min_length=2), "one row": dict(before=4, min_length=1)}[case]
    if case == "one row":
        ids, mask = ids[:1], mask[:1]
    assert prefix.split(ids, mask, **kwargs) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_passes_over_the_split_equal_passes_over_whole_rows(tiny, monkeypatch, dtype):
    """Logits, values and the LoRA gradient with the chat template's prefix run once equal those of whole rows."""
    model, tok = tiny
    cfg = PPOConfig(batch_size=4, response_length=6, compute_dtype=dtype)
    policy = PolicyWithValue(copy.deepcopy(model), cfg)
    with torch.no_grad():  # a policy away from the reference, so the adapter's share of the pass is not zero
        for p in policy.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    prompts = ["Hi.", "Tell me something about topic 3 today.", "Why?", "A longer question about the sea?"]
    ro = steps.collect(policy, tok, prompts, cfg, seed=0)
    ids, attn = ro.sequences
    assert len(set(ro.query_mask.sum(1).tolist())) > 1  # rows of different padding
    splits = []
    original = prefix.split
    monkeypatch.setattr(prefix, "split", lambda *a: splits.append(original(*a)) or splits[-1])

    def passes(min_tokens: int) -> tuple[torch.Tensor, ...]:
        policy.shared_prefix_min_tokens = min_tokens
        policy.zero_grad()
        logits, values = policy(ids, attn, keep=ro.response.shape[1] + 1, skip_last=True)
        (logits.logsumexp(-1).sum() + values.sum()).backward()
        ref = policy.reference_logits(ids, attn, keep=ro.response.shape[1] + 1, skip_last=True)
        grad = torch.cat([p.grad.flatten() for p in policy.trainable_parameters()])
        return logits.detach(), values.detach(), ref, grad

    whole = passes(0)
    assert splits == [None, None]
    shared = passes(8)
    assert len(splits) == 4 and all(s is not None and len(s.ids) >= 8 for s in splits[2:])
    tol = 1e-4 if dtype == "float32" else 5e-2  # bf16 products: the same sums in another order round differently
    for a, b in zip(whole[:3], shared[:3], strict=True):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=tol, rtol=0), (a - b).abs().max()
    assert torch.linalg.vector_norm(whole[3] - shared[3]) <= 0.02 * torch.linalg.vector_norm(whole[3])
