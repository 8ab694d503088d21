"""A PPO update on 2 ranks (torchrun, gloo, CPU) equals the same update on one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("round_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_train_the_same_weights_as_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    run([sys.executable, str(WORKER), str(tiny_model_dir), str(tmp_path / "one.pt")], tmp_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(WORKER), str(tiny_model_dir),
         str(tmp_path / "two.pt")], tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (one["world"], two["world"]) == (1, 2) and one["epochs"] == two["epochs"] == 2
    # The gathered forward passes are the same rows in the same order.
    assert torch.allclose(one["logprobs"], two["logprobs"], atol=1e-5)
    assert torch.allclose(one["values"], two["values"], atol=1e-5)
    moved = max(float((one["after"][k] - one["before"][k]).abs().max()) for k in one["after"])
    apart = max(float((one["after"][k] - two["after"][k]).abs().max()) for k in one["after"])
    assert moved > 1e-3  # the update did move the weights ...
    # ... and both world sizes moved them alike, up to the order of float sums (Adam's first steps are
    # nearly sign(gradient), so a gradient that differs shows up as a difference the size of the move).
    assert apart < 0.01 * moved
    assert set(one["after"]) == set(two["after"])
