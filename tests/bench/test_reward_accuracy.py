"""bench reward-accuracy end to end on the tiny model: ratings in, both reward variants scored on every held-out pair."""

from __future__ import annotations

import argparse
import json
import random

import pytest

from rlhf_online.bench import reward_accuracy


def test_the_bootstrap_interval_brackets_the_accuracy_and_collapses_when_all_agree():
    rng = random.Random(0)
    assert reward_accuracy.bootstrap_interval([[True, True], [True]], rng) == (1.0, 1.0)
    mixed = [[True, False, True], [False], [True, True], [False, False, True], [True]]
    lo, hi = reward_accuracy.bootstrap_interval(mixed, rng)
    acc = sum(map(sum, mixed)) / sum(map(len, mixed))
    assert 0.0 < lo < acc < hi < 1.0


@pytest.mark.slow
def test_the_benchmark_rates_trains_and_scores_every_heldout_pair(tiny_model_dir, tmp_path):
    p = argparse.ArgumentParser()
    reward_accuracy.add_arguments(p)
    args = p.parse_args(["--base-model", str(tiny_model_dir), "--train-prompts", "12", "--heldout-prompts", "5",
                         "--max-new-tokens", "6", "--out", str(tmp_path)])
    assert reward_accuracy.main(args) == 0
    result = json.loads((tmp_path / "reward_accuracy.json").read_text())
    assert result["feedback"] == 24 and result["preferences"] == 12  # two thumbs and one pick per train prompt
    assert [v["encoder_layer"] for v in result["variants"]] == [3, 6]
    for v in result["variants"]:
        assert v["heldout_pairs"] + v["ties_skipped"] == 5 * 6  # all pairs of 4 replies to 5 prompts
        assert v["ci95"][0] <= v["pairwise_accuracy"] <= v["ci95"][1]
    assert "| default (layer 3, linear head) |" in (tmp_path / "reward_accuracy.md").read_text()
    with pytest.raises(SystemExit, match="even"):
        reward_accuracy.main(p.parse_args(["--train-replies", "3"]))
