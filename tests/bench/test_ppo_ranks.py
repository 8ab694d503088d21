"""bench ppo --world-size 2 on the tiny model: both world sizes run on the same samples and train the same adapter."""

from __future__ import annotations

import argparse
import json

import pytest

from rlhf_online.bench import ppo
from rlhf_online.errors import ConfigError


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    ppo.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.slow
def test_one_rank_and_two_ranks_train_the_same_adapter(tiny_model_dir, tmp_path):
    args = parse("--world-size", "2", "--steps", "1", "--batch-size", "5", "--response-length", "6",
                 "--num-ppo-epochs", "2", "--base-model", str(tiny_model_dir), "--out", str(tmp_path))
    assert ppo.main(args) == 0
    r = json.loads((tmp_path / "ppo_world_size.json").read_text())
    assert [(s["ranks"], s["threads_per_rank"]) for s in r["sides"].values()] == [(1, 2), (2, 1)]
    assert all(len(s["step_s"]) == 1 and s["samples_per_s"] > 0 for s in r["sides"].values())
    assert r["speedup"] == pytest.approx(r["sides"]["2"]["samples_per_s"] / r["sides"]["1"]["samples_per_s"])
    assert r["max_abs_weight_change"] > 0  # training moved the weights ...
    assert r["relative_difference"] < 0.01  # ... and both world sizes moved them alike
    assert "| 2 x 1 |" in (tmp_path / "ppo_world_size.md").read_text()


def test_a_world_size_below_one_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--world-size"):
        ppo.main(parse("--world-size", "0", "--out", str(tmp_path)))
