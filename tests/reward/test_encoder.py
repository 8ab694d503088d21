"""The sentence encoder's embedding cache: same vectors as a fresh encode, bounded, skipped when disabled."""

from __future__ import annotations

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
