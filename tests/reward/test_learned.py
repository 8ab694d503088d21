"""The learned reward model: it learns a hidden preference from noisy feedback, and its versions are gated."""

from __future__ import annotations

import pytest

from rlhf_online.data.split import is_heldout
from rlhf_online.reward.registry import RewardRegistry
from rlhf_online.reward.training import TrainConfig, build_dataset, prompt_key, train_and_gate
from rlhf_online.store import open_store


def test_dataset_uses_thumbs_pairs_and_preferences_and_holds_out_by_prompt(filled_store):
    data = build_dataset(filled_store, TrainConfig())
    assert data.feedback_seen == filled_store.count_feedback() + len(filled_store.list_preferences())
    assert data.train.pairs and data.train.singles and data.heldout.pairs and data.heldout.singles
    train_prompts = {prompt_key(c) for c in data.train.completions.values()}
    heldout_prompts = {prompt_key(c) for c in data.heldout.completions.values()}
    assert not train_prompts & heldout_prompts
    assert all(is_heldout(k, 20) for k in heldout_prompts)


def test_the_dataset_reads_its_completions_in_batches(filled_store, monkeypatch):
    def one_at_a_time(completion_id):
        raise AssertionError("build_dataset fetched a completion on its own")

    monkeypatch.setattr(filled_store, "get_completion", one_at_a_time)
    data = build_dataset(filled_store, TrainConfig())
    referenced = {f.completion_id for f in filled_store.list_feedback()}
    assert referenced <= data.train.completions.keys() | data.heldout.completions.keys()


def test_learns_the_hidden_preference_well_above_chance(filled_store, encoder, tmp_path):
    manifest, promoted, reason = train_and_gate(RewardRegistry(tmp_path / "rm"), filled_store, encoder, TrainConfig())
    m = manifest["metrics"]
    # Measured 0.85 pairwise / 0.73 pointwise on this data (52 held-out pairs; 0.90 / 0.81 with the
    # earlier last-layer MLP head, which does worse on real replies); chance is 0.5.
    assert m["pairwise_accuracy"] >= 0.78, m
    assert m["pointwise_accuracy"] >= 0.70, m
    # Calibrated better than always saying 0.5 (Brier 0.25, and ECE |0.5 - base rate|): measured 0.19 / 0.08.
    assert m["brier"] < 0.22 and m["ece"] < 0.15, m
    assert promoted and manifest["version"] == "r000001" and reason == "first reward model"


def test_calibration_error_by_hand():
    import torch

    from rlhf_online.reward.training import expected_calibration_error

    y = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert expected_calibration_error(torch.tensor([1.0, 0.0, 1.0, 1.0]), y) == 0.0  # certain and right
    # One bin at 0.5 holding all four, of which 3 are positive: |0.5 - 0.75| = 0.25.
    assert abs(expected_calibration_error(torch.full((4,), 0.5), y) - 0.25) < 1e-6
    # Bins 0.9 (two, both positive: 0.1 off) and 0.1 (two, one positive: 0.4 off), each half the weight.
    p = torch.tensor([0.9, 0.1, 0.9, 0.1])
    assert abs(expected_calibration_error(p, torch.tensor([1.0, 0.0, 1.0, 1.0])) - 0.25) < 1e-6


def test_a_worse_candidate_is_kept_but_not_promoted(filled_store, encoder, tmp_path, monkeypatch):
    import torch
    from torch import nn

    import rlhf_online.reward.training as training_module

    registry = RewardRegistry(tmp_path / "rm")
    train_and_gate(registry, filled_store, encoder, TrainConfig())
    real_train = training_module.train

    def backwards(*args, **kwargs):  # a candidate that ranks every pair the wrong way round
        model = real_train(*args, **kwargs)
        with torch.no_grad():
            for net in model.head.nets:
                last = net if isinstance(net, nn.Linear) else net[-1]
                last.weight.neg_()
                last.bias.neg_()
        return model

    monkeypatch.setattr(training_module, "train", backwards)
    manifest, promoted, reason = train_and_gate(registry, filled_store, encoder, TrainConfig())
    assert not promoted and "held-out pairwise accuracy" in reason
    assert manifest["metrics"]["pairwise_accuracy"] < 0.5 < manifest["metrics"]["previous_pairwise_accuracy"]
    assert registry.current() == "r000001" and registry.versions() == ["r000001", "r000002"]
    assert registry.manifest("r000002")["promoted"] is False


def test_too_little_feedback_trains_nothing(tmp_path, encoder):
    store = open_store(f"sqlite:///{tmp_path / 'empty.db'}")
    manifest, promoted, reason = train_and_gate(RewardRegistry(tmp_path / "rm"), store, encoder, TrainConfig())
    assert not promoted and manifest["version"] == "" and "not enough feedback" in reason


def test_a_tampered_version_is_refused(filled_store, encoder, tmp_path):
    registry = RewardRegistry(tmp_path / "rm")
    train_and_gate(registry, filled_store, encoder, TrainConfig())
    head = tmp_path / "rm" / "r000001" / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="manifest"):
        registry.load("r000001", encoder)


def test_a_registry_with_the_old_pointer_file_is_served_and_gated_against(filled_store, encoder, tmp_path):
    import json

    registry = RewardRegistry(tmp_path / "rm")
    train_and_gate(registry, filled_store, encoder, TrainConfig(epochs=100))
    # The pointer as registries wrote it before CURRENT was shared with the adapter registry.
    (registry.root / "CURRENT").unlink()
    (registry.root / "CURRENT.json").write_text(json.dumps({"version": "r000001", "promoted_at": 1.0}))
    old = RewardRegistry(registry.root)
    assert old.current() == "r000001" and old.load("r000001", encoder).version == "r000001"
    manifest, promoted, reason = train_and_gate(old, filled_store, encoder, TrainConfig(epochs=100))
    assert manifest["version"] == "r000002" and manifest["parent"] == "r000001" and "vs r000001" in reason
    assert old.current() == ("r000002" if promoted else "r000001")


def test_scores_rank_kind_above_rude(filled_store, encoder, tmp_path):
    registry = RewardRegistry(tmp_path / "rm")
    train_and_gate(registry, filled_store, encoder, TrainConfig())
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


def test_a_head_trained_on_another_encoder_layer_is_refused(filled_store, encoder, tmp_path):
    from rlhf_online.errors import ConfigError
    from rlhf_online.reward.encoder import TextEncoder

    registry = RewardRegistry(tmp_path / "rm")
    train_and_gate(registry, filled_store, encoder, TrainConfig())
    with pytest.raises(ConfigError, match="encoder_layer: .* trained on encoder layer 3, but the encoder pools layer 6"):
        registry.load("r000001", TextEncoder(layer=-1))


def test_an_mlp_head_trains_saves_and_loads(filled_store, encoder, tmp_path):
    registry = RewardRegistry(tmp_path / "rm")
    manifest, _, _ = train_and_gate(registry, filled_store, encoder, TrainConfig(head_hidden=64, epochs=300))
    assert manifest["metrics"]["pairwise_accuracy"] >= 0.7, manifest["metrics"]
    model = registry.load("r000001", encoder)
    assert model.cfg.hidden == 64 and model.cfg.encoder_layer == 3
    kind, rude = model.score(["How was your day?"] * 2, ["It was lovely, thank you!", "Terrible. Leave me alone, idiot."])
    assert kind > rude


def test_the_dataset_is_in_the_same_order_in_every_process(tmp_path):
    # The heads' bootstrap resamples index the examples by position: an order that followed string
    # hashing (a set's) gave another reward model in every process from the same feedback.
    import os
    import subprocess
    import sys

    script = ("import json, sys; from rlhf_online.simulate.synthetic import fill_store; "
              "from rlhf_online.store import open_store; from rlhf_online.reward.training import TrainConfig, build_dataset; "
              "s = open_store(sys.argv[1]); fill_store(s) if not s.count_feedback() else None; "
              "d = build_dataset(s, TrainConfig()); print(json.dumps([d.train.pairs, d.train.singles, list(d.train.completions)]))")
    url = f"sqlite:///{tmp_path / 'f.db'}"
    outs = [subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert outs[0] == outs[1] and len(outs[0]) > 1000
