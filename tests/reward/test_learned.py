"""The learned reward model: it learns a hidden preference from noisy feedback, and its versions are gated."""

from __future__ import annotations

import pytest

from rlhf_online.reward.registry import RewardRegistry
from rlhf_online.reward.training import TrainConfig, build_dataset, is_heldout, prompt_key
from rlhf_online.store import open_store


def test_dataset_uses_thumbs_pairs_and_preferences_and_holds_out_by_prompt(filled_store):
    data = build_dataset(filled_store, TrainConfig())
    assert data.feedback_seen == filled_store.count_feedback() + len(filled_store.list_preferences())
    assert data.train.pairs and data.train.singles and data.heldout.pairs and data.heldout.singles
    train_prompts = {prompt_key(c) for c in data.train.completions.values()}
    heldout_prompts = {prompt_key(c) for c in data.heldout.completions.values()}
    assert not train_prompts & heldout_prompts
    assert all(is_heldout(k, 20) for k in heldout_prompts)


def test_learns_the_hidden_preference_well_above_chance(filled_store, encoder, tmp_path):
    manifest, promoted, reason = RewardRegistry(tmp_path / "rm").train_and_gate(filled_store, encoder, TrainConfig())
    m = manifest["metrics"]
    # Measured 0.90 pairwise / 0.81 pointwise on this data (52 held-out pairs); chance is 0.5.
    assert m["pairwise_accuracy"] >= 0.78, m
    assert m["pointwise_accuracy"] >= 0.70, m
    assert 0.0 <= m["ece"] <= 1.0 and 0.0 <= m["brier"] <= 1.0
    assert promoted and manifest["version"] == "r000001" and reason == "first reward model"


def test_a_worse_candidate_is_kept_but_not_promoted(filled_store, encoder, tmp_path):
    registry = RewardRegistry(tmp_path / "rm")
    registry.train_and_gate(filled_store, encoder, TrainConfig())
    # epochs=0 leaves the head at its random init: a candidate no better than chance.
    manifest, promoted, reason = registry.train_and_gate(filled_store, encoder, TrainConfig(epochs=0))
    assert not promoted and "held-out pairwise accuracy" in reason
    assert registry.current() == "r000001" and registry.versions() == ["r000001", "r000002"]
    assert registry.manifest("r000002")["promoted"] is False


def test_too_little_feedback_trains_nothing(tmp_path, encoder):
    store = open_store(f"sqlite:///{tmp_path / 'empty.db'}")
    manifest, promoted, reason = RewardRegistry(tmp_path / "rm").train_and_gate(store, encoder, TrainConfig())
    assert not promoted and manifest["version"] == "" and "not enough feedback" in reason


def test_a_tampered_version_is_refused(filled_store, encoder, tmp_path):
    registry = RewardRegistry(tmp_path / "rm")
    registry.train_and_gate(filled_store, encoder, TrainConfig())
    head = tmp_path / "rm" / "r000001" / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="manifest"):
        registry.load("r000001", encoder)


def test_scores_rank_kind_above_rude(filled_store, encoder, tmp_path):
    registry = RewardRegistry(tmp_path / "rm")
    registry.train_and_gate(filled_store, encoder, TrainConfig())
    model = registry.load(registry.current(), encoder)
    kind, rude = model.score(["How was your day?"] * 2, ["It was lovely, thank you for asking!",
                                                        "Terrible. Leave me alone, idiot."])
    assert kind > rude


def test_the_ensemble_is_pessimistic_where_its_members_disagree(filled_store, encoder, tmp_path):
    import torch

    from rlhf_online.reward.learned import LearnedReward
    from rlhf_online.reward.training import train

    data = build_dataset(filled_store, TrainConfig())
    model = train(encoder, data, TrainConfig(ensemble=4, pessimism=2.0), "r000001")
    texts = ["Thank you so much for asking!", "Ugh, pathetic and boring.",
             "zxq vlorp 7731 ##! qwerty zzzz", "The weather in the spreadsheet is purple."]
    feats = torch.cat([encoder.embed(texts), encoder.embed(["a prompt"] * 4) * encoder.embed(texts)], dim=-1)
    with torch.no_grad():
        members = model.head.members(feats)  # [4 members, 4 texts]
    assert members.shape == (4, 4) and bool((members.std(0) > 0).all())  # bootstrap resamples differ
    served = torch.tensor(model.score(["a prompt"] * 4, texts)) + model.cfg.offset
    expected = members.mean(0) - 2.0 * members.std(0, unbiased=False)
    assert torch.allclose(served, expected, atol=1e-5)
    # Saved and loaded, the ensemble scores the same.
    model.save(tmp_path)
    again = LearnedReward.load(tmp_path, encoder, "r000001")
    assert again.score(["a prompt"] * 4, texts) == pytest.approx(model.score(["a prompt"] * 4, texts), abs=1e-5)
