"""bench ppo-learning on the tiny model: the curves' shape, and that the variants differ only once moments carry."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from rlhf_online import cli
from rlhf_online.bench import ppo_learning


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    ppo_learning.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.slow
def test_both_variants_train_alike_until_the_kept_moments_carry_into_a_second_round(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    # The tiny model's random text has no sentiment to speak of: reward its length instead, so the rounds learn.
    monkeypatch.setattr(ppo_learning, "scripted_reward", lambda prompts, texts, ids=(): [len(t) / 10 for t in texts])
    args = parse("--base-model", str(tiny_model_dir), "--rounds", "2", "--eval-every", "1", "--seeds", "1",
                 "--batch-size", "4", "--response-length", "4", "--num-ppo-epochs", "2", "--eval-samples", "1",
                 "--learning-rate", "3e-2", "--compute-dtype", "float32", "--out", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: every kernel sums in one order, so equal work gives equal bits
    try:
        assert ppo_learning.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    r = json.loads((tmp_path / "ppo_learning.json").read_text())
    fresh, kept = (next(run["curve"] for run in r["runs"] if run["variant"] == v) for v in ("fresh", "kept"))
    assert [p["round"] for p in fresh] == [p["round"] for p in kept] == [0, 1, 2]
    assert fresh[0] == kept[0] and abs(fresh[0]["kl"]) < 1e-6  # the bare base
    assert fresh[1]["kl"] > 0 and (fresh[1]["reward"], fresh[1]["kl"]) == (kept[1]["reward"], kept[1]["kl"])
    assert fresh[2]["kl"] != kept[2]["kl"]  # round 2 went on from round 1's AdamW moments in one of them only
    md = (tmp_path / "ppo_learning.md").read_text()
    assert "| fresh | 2 |" in md and "| kept | 2 |" in md


def test_an_unknown_variant_is_refused_naming_the_flag(tmp_path):
    with pytest.raises(SystemExit, match="--variants: unknown adam"):
        ppo_learning.main(parse("--variants", "fresh,adam", "--out", str(tmp_path)))


def test_the_benchmark_is_a_subcommand_of_bench():
    assert "ppo-learning" in cli.BENCHES
