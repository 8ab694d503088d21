"""The sentence encoder: its embedding cache (same vectors as a fresh encode, bounded, off at 0) and the pooled layer."""

from __future__ import annotations

import pytest
import torch


def test_cached_embeddings_equal_fresh_ones_and_only_new_texts_are_encoded(encoder, monkeypatch):
    texts = ["a warm reply", "a rude reply", "a warm reply"]
    first = encoder.embed(texts)
    encoded: list[str] = []
    real = encoder._encode
    monkeypatch.setattr(encoder, "_encode", lambda ts: (encoded.extend(ts), real(ts))[1])
    again = encoder.embed(["a rude reply", "something new", "a warm reply"])
    assert encoded == ["something new"]
    assert torch.allclose(again[0], first[1]) and torch.allclose(again[2], first[0])
    assert torch.allclose(again[1], real(["something new"])[0], atol=1e-6)
    assert encoder.embed([]).shape == (0, encoder.dim)


def test_the_cache_stays_within_its_size_and_zero_disables_it(encoder, monkeypatch):
    monkeypatch.setattr(encoder, "_cache", type(encoder._cache)())
    monkeypatch.setattr(encoder, "cache_size", 3)
    encoder.embed([f"text {i}" for i in range(5)])
    assert list(encoder._cache) == ["text 2", "text 3", "text 4"]  # least recently used went first
    monkeypatch.setattr(encoder, "cache_size", 0)
    monkeypatch.setattr(encoder, "_cache", type(encoder._cache)())
    encoder.embed(["uncached"])
    assert not encoder._cache


def test_the_pooled_layer_is_the_full_models_hidden_state_of_that_layer(encoder):
    from transformers import AutoModel

    from rlhf_online.reward.encoder import TextEncoder

    assert encoder.layer == 3 and len(encoder.model.encoder.layer) == 3  # layers above it are not computed
    full = AutoModel.from_pretrained(encoder.path).eval()
    texts = ["a short warm reply", "a longer and much ruder reply than the first one"]
    batch = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = full(**batch, output_hidden_states=True).hidden_states  # embeddings + 6 layers
    mask = batch["attention_mask"].unsqueeze(-1).float()
    for layer, enc in ((3, encoder), (-1, TextEncoder(layer=-1, cache_size=0))):
        pooled = torch.nn.functional.normalize((states[layer] * mask).sum(1) / mask.sum(1), dim=-1)
        assert torch.allclose(enc.embed(texts), pooled, atol=1e-5)


def test_a_layer_the_encoder_lacks_is_a_config_error():
    from rlhf_online.errors import ConfigError
    from rlhf_online.reward.encoder import TextEncoder

    with pytest.raises(ConfigError, match="encoder_layer: 7"):
        TextEncoder(layer=7)


def test_bf16_compute_stays_within_a_hair_of_fp32_and_small_batches_stay_fp32(encoder, monkeypatch):
    from rlhf_online.reward.encoder import AUTOCAST_MIN_ROWS

    texts = [f"reply number {i}: thank you so much, that was lovely" for i in range(AUTOCAST_MIN_ROWS + 4)]
    fp32 = encoder._encode(texts)
    monkeypatch.setattr(encoder, "compute_dtype", torch.bfloat16)
    bf16 = encoder._encode(texts)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # computed differently ...
    assert (bf16 * fp32).sum(-1).min() > 0.999  # ... to the same embeddings (both are unit vectors)
    few = texts[: AUTOCAST_MIN_ROWS - 1]
    assert torch.allclose(encoder._encode(few), fp32[: len(few)], atol=1e-5)  # too few rows to pay for the casts
