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


def test_rank_n_settings_that_cannot_make_the_arms_are_refused_before_generating():
    p = argparse.ArgumentParser()
    reward_accuracy.add_arguments(p)
    with pytest.raises(SystemExit, match="--rank-n: invalid value 2"):
        reward_accuracy.main(p.parse_args(["--rank-n", "2"]))
    with pytest.raises(SystemExit, match="multiple of --rank-n"):
        reward_accuracy.main(p.parse_args(["--rank-n", "4", "--train-replies", "6"]))
    # 12 prompts x 1 preference: too few pairs for the reward training's minimum of 16 in the equal-events arm.
    with pytest.raises(SystemExit, match="'preferences, as many events as rankings'.*at least 16 train prompts"):
        reward_accuracy.main(p.parse_args(["--rank-n", "4", "--train-prompts", "12"]))
    # --rank-n 3 rates 6 replies per prompt by default (a multiple of 3 and of 2): 2 events per prompt, 8 prompts.
    with pytest.raises(SystemExit, match="at least 8 train prompts"):
        reward_accuracy.main(p.parse_args(["--rank-n", "3", "--train-prompts", "2"]))


@pytest.mark.slow
def test_rank_n_compares_rankings_with_preferences_on_the_same_replies(tiny_model_dir, tmp_path, monkeypatch):
    stores = []
    compared_store = reward_accuracy.compared_store
    monkeypatch.setattr(reward_accuracy, "compared_store", lambda *a: stores.append(compared_store(*a)) or stores[-1])
    p = argparse.ArgumentParser()
    reward_accuracy.add_arguments(p)
    args = p.parse_args(["--base-model", str(tiny_model_dir), "--train-prompts", "16", "--heldout-prompts", "5",
                         "--rank-n", "4", "--max-new-tokens", "6", "--out", str(tmp_path)])
    assert reward_accuracy.main(args) == 0
    result = json.loads((tmp_path / "reward_accuracy_rank.json").read_text())
    assert not (tmp_path / "reward_accuracy.json").exists()  # the default run's report is left alone
    assert result["train_replies"] == 4  # --rank-n 4's default
    arms = result["arms"]
    assert [a["arm"] for a in arms] == ["preferences (n=2)", "rankings (n=4)", "preferences, as many events as rankings"]
    assert [a["rating_events"] for a in arms] == [16 * 2, 16 * 1, 16 * 1]
    assert [(a["preferences"], a["rankings"]) for a in arms] == [(32, 0), (0, 16), (16, 0)]
    assert [a["training_pairs"] for a in arms] == [32, 16 * 6, 16]  # a ranking of 4 trains as its 6 pairs
    for a in arms:
        assert a["encoder_layer"] == 3 and a["heldout_pairs"] + a["ties_skipped"] == 5 * 6
        assert a["ci95"][0] <= a["pairwise_accuracy"] <= a["ci95"][1]
        lo, hi = a["gain_per_100_events_ci95"]
        assert a["gain_per_100_events"] == pytest.approx(100 * (a["pairwise_accuracy"] - 0.5) / a["rating_events"])
        assert lo <= a["gain_per_100_events"] <= hi
    # Comparisons only: no thumbs in any arm. The ranking arm's store: 16 rankings of 4, each of one prompt's replies.
    assert [s.count_feedback() for s in stores] == [0, 0, 0]
    rankings = stores[1].list_rankings()
    assert len(rankings) == 16 and all(len(r.completion_ids) == 4 for r in rankings)
    assert sorted({c.rsplit("-", 1)[0] for c in r.completion_ids}.pop() for r in rankings) == \
        [f"cmpl-bench-{n:04d}" for n in range(16)]
    assert all(len({c.rsplit("-", 1)[0] for c in r.completion_ids}) == 1 for r in rankings)
    # The equal-events arm is the first arm's first preference of each prompt, verdict for verdict.
    first = {(p.chosen_completion_id, p.rejected_completion_id) for p in stores[0].list_preferences()}
    assert {(p.chosen_completion_id, p.rejected_completion_id) for p in stores[2].list_preferences()} <= first
    md = (tmp_path / "reward_accuracy_rank.md").read_text()
    assert "| rankings (n=4) | 16 | 96 |" in md and "no thumbs" in md
