"""The running batch's cache layers: in-place appends into buffers with room, the same keys as transformers' cat."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rlhf_online.engine import batch
from rlhf_online.engine.engine import Engine
from rlhf_online.engine.interface import EngineConfig
from rlhf_online.engine.request import SamplingParams

PROMPTS = ["Hello there.", "Tell me a long story about a dragon who lived in the mountains.", "Why?",
           "Write a haiku about tea and biscuits on a rainy afternoon in the garden.", "What is tea?"]


def _states(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, n, 4, generator=g).to(torch.bfloat16) for _ in range(2))


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_a_growing_layer_holds_what_dynamic_layers_cat_holds_and_appends_in_place(dtype):
    ours, theirs = batch.GrowingLayer(dtype), DynamicLayer()
    buffers = []
    for step, n in enumerate([5] + [1] * (batch.GROW_BY + 3)):  # a prefill, then decode steps past the spare room
        k, v = _states(n, step)
        keys, values = ours.update(k, v)
        expected_keys, expected_values = theirs.update(k, v)
        assert keys.dtype == (dtype or torch.bfloat16)
        assert torch.equal(keys, expected_keys.to(keys.dtype)) and torch.equal(values, expected_values.to(keys.dtype))
        assert ours.get_seq_length() == theirs.get_seq_length() == keys.shape[2]
        buffers.append(ours._k.data.data_ptr())
    # The prefill left GROW_BY free positions: that many steps write into its buffer, then a larger one takes over.
    assert buffers[: batch.GROW_BY + 1] == [buffers[0]] * (batch.GROW_BY + 1) and buffers[-1] != buffers[0]
    # Assigning (KVBatch's merge and select) keeps the tensor's values, in the buffer's dtype, with room again.
    ours.keys, ours.values = theirs.keys[:1], theirs.values[:1]
    assert torch.equal(ours.keys, theirs.keys[:1].to(ours.keys.dtype)) and ours._k.data.shape[2] > ours.keys.shape[2]


def test_a_cache_moves_into_growing_layers_with_its_contents():
    cache = DynamicCache()
    k, v = _states(6, 0)
    cache.update(k, v, 0)
    cache.update(k * 2, v * 2, 1)
    grown = batch.growing(cache, torch.float32)
    assert all(isinstance(layer, batch.GrowingLayer) for layer in grown.layers)
    assert torch.equal(grown.layers[1].keys, (k * 2).float()) and grown.get_seq_length() == 6
    assert batch.growing(grown) is grown and grown.layers[0].keys.dtype == torch.float32


@pytest.mark.parametrize("cache_dtype", [None, torch.float32])
def test_a_bf16_engine_decodes_the_same_tokens_with_growing_layers_as_with_cat(tiny, monkeypatch, cache_dtype):
    """Rows join and leave a running batch (max 2 rows, 5 requests): merge, select and trim on the buffers.

    Every request is queued before the loop starts, so the batches are the same in both runs (in bf16 a row's
    numbers depend on which rows share its products).
    """
    model = copy.deepcopy(tiny[0]).to(torch.bfloat16)

    def run() -> list[tuple[int, ...]]:
        engine = Engine(copy.deepcopy(model), tiny[1], EngineConfig(max_batch_size=2))
        if cache_dtype is None:
            engine._cache_dtype = None  # buffers in the keys' own dtype
        handles = [engine.submit(engine.encode_prompt(p), SamplingParams(max_new_tokens=6 + 5 * i, temperature=1.0,
                                                                           seed=i)) for i, p in enumerate(PROMPTS)]
        engine.start()
        try:
            return [r.token_ids for h in handles for r in h.result()]
        finally:
            engine.stop()

    grown = []
    growing = batch.growing
    monkeypatch.setattr(batch, "growing", lambda cache, dtype=None: grown.append(dtype) or growing(cache, dtype))
    ours = run()
    assert grown and set(grown) == {cache_dtype}  # every prefilled batch's cache went into GrowingLayers
    monkeypatch.setattr(batch, "growing", lambda cache, dtype=None: cache)  # transformers' own layers
    assert run() == ours and all(ours)


def test_an_engine_with_an_fp32_cache_counts_a_position_twice_against_max_batch_tokens(tiny):
    """Four rows fit the batch; a budget of four rows' positions holds two when each counts twice."""
    model = copy.deepcopy(tiny[0]).to(torch.bfloat16)
    probe = Engine(model, tiny[1])
    assert probe._cache_dtype == torch.float32 and probe._position_cost == 2
    encoded = [probe.encode_prompt(PROMPTS[0])] * 4
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    per_row = len(encoded[0]) + params.max_new_tokens
    engine = Engine(model, tiny[1], EngineConfig(max_batch_size=4, max_batch_tokens=4 * per_row))
    handles = [engine.submit(ids, params) for ids in encoded]
    engine.start()
    try:
        assert all(h.result()[0].completion_tokens == 16 for h in handles)
    finally:
        engine.stop()
    assert engine.stats["max_rows"] == 2


def test_growing_leaves_sliding_window_layers_alone_and_makes_growing_layers_for_a_cache_without_config():
    from transformers.cache_utils import DynamicSlidingWindowLayer

    sliding = DynamicSlidingWindowLayer(sliding_window=4)
    cache = DynamicCache()
    cache.layers.append(sliding)
    assert batch.growing(cache).layers[0] is sliding
    empty = batch.growing(DynamicCache(), torch.float32)
    k, v = _states(3, 0)
    empty.update(k, v, 0)
    assert isinstance(empty.layers[0], batch.GrowingLayer) and empty.layers[0].keys.dtype == torch.float32
