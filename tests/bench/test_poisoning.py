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
                         "--out", str(tmp_path)])
    assert poisoning.main(args) == 0
    result = json.loads((tmp_path / "poisoning.json").read_text())
    assert (result["honest_requests"], result["attacker_requests"]) == (12, 12)
    assert (result["honest_ratings"], result["attacker_ratings"]) == (36, 36)  # two thumbs and a pick each
    honest, uncapped, capped = result["arms"]
    assert honest["train_metrics"]["users"] == 4 and uncapped["train_metrics"]["users"] == 5
    # The attacker sent as much as the four honest users together: half the weight, until the cap.
    assert uncapped["train_metrics"]["largest_user_share"] == pytest.approx(0.5, abs=0.02)
    assert uncapped["train_metrics"]["largest_user_share_capped"] == pytest.approx(0.5, abs=0.02)
    assert capped["train_metrics"]["largest_user_share_capped"] == pytest.approx(0.2, abs=0.02)  # 5 users: equal
    for arm in result["arms"]:
        assert arm["ci95"][0] <= arm["pairwise_accuracy"] <= arm["ci95"][1]
    assert "| with the attacker, cap 0.05 |" in (tmp_path / "poisoning.md").read_text()
