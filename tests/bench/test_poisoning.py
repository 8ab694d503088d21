"""bench poisoning end to end on the tiny model: keys, honest users, an attacker, three reward models scored."""

from __future__ import annotations

import argparse
import json

import pytest

from rlhf_online.bench import poisoning


@pytest.mark.slow
def test_the_benchmark_floods_through_the_api_and_scores_three_arms(tiny_model_dir, tmp_path):
    p = argparse.ArgumentParser()
    poisoning.add_arguments(p)
    args = p.parse_args(["--base-model", str(tiny_model_dir), "--users", "4", "--requests-per-user", "3",
                         "--attack-factor", "4", "--heldout-prompts", "5", "--max-new-tokens", "4",
                         "--concurrency", "1", "--out", str(tmp_path)])
    assert poisoning.main(args) == 0  # one request at a time: the same replies, hence the same thumbs, every run
    result = json.loads((tmp_path / "poisoning.json").read_text())
    assert (result["honest_requests"], result["attacker_requests"]) == (12, 12)
    assert (result["honest_ratings"], result["attacker_ratings"]) == (36, 36)  # two thumbs and a pick each
    honest, uncapped, capped = result["arms"]
    assert honest["train_metrics"]["users"] == 4 and uncapped["train_metrics"]["users"] == 5
    # The attacker sent as many ratings as the four honest users together: about half the weight (not exactly:
    # the reward's held-out split takes some prompts, and thumbs imply pairs as the replies happen to be rated).
    raw = uncapped["train_metrics"]["largest_user_share"]
    assert 0.45 <= raw <= 0.56
    assert uncapped["train_metrics"]["largest_user_share_capped"] == raw  # cap 1: nothing scaled
    assert capped["train_metrics"]["largest_user_share"] == raw  # the same data
    assert capped["train_metrics"]["largest_user_share_capped"] == pytest.approx(0.2, abs=1e-3)  # 5 users: equal
    for arm in result["arms"]:
        assert arm["ci95"][0] <= arm["pairwise_accuracy"] <= arm["ci95"][1]
    assert "| with the attacker, cap 0.05 |" in (tmp_path / "poisoning.md").read_text()
