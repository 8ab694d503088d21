"""bench canary on a few hundred simulated canaries per effect: the JSON's figures, and worse is promoted less than better."""

from __future__ import annotations

import argparse
import json

import pytest

from rlhf_online import cli
from rlhf_online.bench import all as bench_all
from rlhf_online.bench import canary


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    canary.add_arguments(p)
    return p.parse_args(list(argv))


def test_the_benchmark_writes_sane_rates_and_a_worse_canary_is_promoted_less(tmp_path):
    assert canary.main(parse("--trials", "300", "--out", str(tmp_path))) == 0
    r = json.loads((tmp_path / "canary.json").read_text())
    assert {"false_promotion_rate", "power", "config", "simulation", "effects", "machine", "date"} <= set(r)
    assert [e["effect"] for e in r["effects"]] == [-0.10, -0.05, 0.0, 0.05, 0.10]
    for e in r["effects"]:
        assert e["promote"] + e["rollback"] + e["timeout"] == pytest.approx(1.0)
        assert 30 <= e["canary_ratings_median"] <= e["canary_ratings_p90"] <= 1000 + 10  # min ratings .. timeout
        assert e["canary_ratings_median"] < e["total_ratings_median"] <= e["total_ratings_p90"]
    by = {e["effect"]: e for e in r["effects"]}
    assert r["false_promotion_rate"] == by[-0.05]["promote"] and r["power"] == by[0.10]["promote"]
    assert 0 <= r["false_promotion_rate"] < 0.15 and 0.6 < r["power"] <= 1
    assert by[-0.10]["promote"] < by[0.0]["promote"] < by[0.10]["promote"]
    assert r["config"]["alpha"] == canary.CanaryTestConfig().alpha and r["simulation"]["trials"] == 300
    md = (tmp_path / "canary.md").read_text()
    assert "| +10 | 0.80 |" in md and "False promotion at -5 points" in md


def test_the_same_seed_gives_the_same_figures_and_flags_reach_the_test(tmp_path):
    args = ("--trials", "100", "--effects=-0.1,0.1", "--max-canary-ratings", "200", "--beta", "0.2")
    canary.main(parse(*args, "--out", str(tmp_path / "a")))
    canary.main(parse(*args, "--out", str(tmp_path / "b")))
    a, b = (json.loads((tmp_path / d / "canary.json").read_text()) for d in ("a", "b"))
    assert a["effects"] == b["effects"] and a["config"]["beta"] == 0.2
    assert a["false_promotion_rate"] is None and a["power"] == a["effects"][1]["promote"]


def test_a_short_timeout_rolls_back_undecided_canaries(tmp_path):
    canary.main(parse("--trials", "100", "--effects=0", "--max-canary-ratings", "31", "--out", str(tmp_path)))
    e = json.loads((tmp_path / "canary.json").read_text())["effects"][0]
    assert e["timeout"] > 0.3 and e["canary_ratings_p90"] <= 31 + 2


@pytest.mark.parametrize("argv", [["--stable-rate", "0.95"], ["--canary-percent", "0"], ["--trials", "0"],
                                  ["--canary-percent", "100", "--pair-fraction", "0"], ["--canary-percent", "101"]])
def test_impossible_simulations_are_refused(argv, tmp_path):
    with pytest.raises(SystemExit):
        canary.main(parse(*argv, "--out", str(tmp_path)))


def test_the_benchmark_is_listed_in_the_cli_and_in_bench_all():
    assert "canary" in cli.BENCHES and "canary" in bench_all.BENCHES


def test_same_users_evidence_is_thinner_so_it_needs_more_ratings(tmp_path):
    """--stable-evidence same-users reads, as --canary-same-users does, only the stable replies of the canary's users."""
    args = ("--trials", "300", "--effects=0.1")
    canary.main(parse(*args, "--out", str(tmp_path / "all")))
    canary.main(parse(*args, "--stable-evidence", "same-users", "--out", str(tmp_path / "same")))
    every, same = (json.loads((tmp_path / d / "canary.json").read_text()) for d in ("all", "same"))
    assert every["simulation"]["stable_evidence"] == "all" and same["simulation"]["stable_evidence"] == "same-users"
    assert same["effects"][0]["canary_ratings_median"] > every["effects"][0]["canary_ratings_median"]


def test_max_looks_bounds_the_wait_and_decides_by_the_lean(tmp_path):
    args = ("--trials", "300", "--effects=-0.05,0.05", "--seed", "3")
    canary.main(parse(*args, "--out", str(tmp_path / "open")))
    canary.main(parse(*args, "--max-looks", "60", "--out", str(tmp_path / "cut")))
    before, after = (json.loads((tmp_path / d / "canary.json").read_text())["effects"] for d in ("open", "cut"))
    for b, a in zip(before, after, strict=True):
        assert b["truncated"] == 0 and a["truncated"] > 0 and a["timeout"] == 0  # the lean decided the rest
        assert a["promote"] + a["rollback"] == pytest.approx(1.0)
        assert a["canary_ratings_p90"] < b["canary_ratings_p90"]  # a bounded wait ...
    worse, better = after
    assert worse["promote"] < better["promote"]  # ... still promoting the better canary more often


def test_every_user_in_the_share_is_judged_on_interleaved_pairs_alone(tmp_path):
    """--canary-percent 100 (the demo's): every request a pair, so evidence comes twice as fast as at 50%."""
    args = ("--trials", "300", "--effects=0.1", "--pair-fraction", "1", "--stable-evidence", "same-users")
    canary.main(parse(*args, "--canary-percent", "50", "--out", str(tmp_path / "half")))
    canary.main(parse(*args, "--canary-percent", "100", "--out", str(tmp_path / "all")))
    half, every = (json.loads((tmp_path / d / "canary.json").read_text())["effects"][0] for d in ("half", "all"))
    assert every["promote"] > 0.5 and every["total_ratings_median"] < half["total_ratings_median"]
