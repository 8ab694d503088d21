"""bench store-growth on two small stores: the JSON's shape, the traffic it logs, and the CLI entry."""

from __future__ import annotations

import argparse
import json
import math

from rlhf_online.bench import store_growth


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    store_growth.add_arguments(p)
    return p.parse_args(list(argv))


def test_the_benchmark_times_every_job_at_every_size(tmp_path):
    args = parse("--sizes", "1200,600", "--rounds", "2", "--baseline-rounds", "1", "--new-per-round", "100",
                 "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path))
    assert store_growth.main(args) == 0
    r = json.loads((tmp_path / "out" / "store_growth.json").read_text())
    assert [s["completions"] for s in r["sizes"]] == [600, 1200]  # sorted
    for s in r["sizes"]:
        logged = s["completions"] + 2 * 100  # the history plus two rounds of new traffic
        # ~30% of replies thumbed, ~10% of pairs preferred: well inside these bounds at these sizes
        assert 0.2 * logged < s["ratings"] < 0.45 * logged
        for key in ("trainer_seconds", "reward_seconds", "dataset_seconds", "baseline_trainer_seconds",
                    "baseline_reward_seconds", "window_load_seconds"):
            assert s[key] > 0
    assert set(r["growth_ratio"]) == {"trainer", "reward", "dataset", "baseline_trainer", "baseline_reward"}
    assert all(math.isfinite(v) and v > 0 for v in r["growth_ratio"].values())
    md = (tmp_path / "out" / "store_growth.md").read_text()
    assert "| 1,200 |" in md and "growth_ratio (1,200 / 600)" in md
    assert not list(tmp_path.rglob("*.db"))  # the stores are removed


def test_sizes_too_small_for_a_round_are_refused(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="--sizes"):
        store_growth.main(parse("--sizes", "100", "--new-per-round", "256", "--out", str(tmp_path)))
