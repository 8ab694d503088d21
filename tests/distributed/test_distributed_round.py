"""A trainer round on 2 ranks (torchrun, gloo): rank 1 follows rank 0's round, the adapter equals one process's,
and a round that fails on rank 0 releases the other rank and the next round works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("trainer_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def run(world: int, model: Path, out: Path) -> dict:
    out.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, str(WORKER)] if world == 1 else \
        [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", str(world), str(WORKER)]
    done = subprocess.run([*cmd, str(model), str(out)], env=env, cwd=out, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_a_round_on_two_ranks_publishes_what_one_process_does(tiny_model_dir: Path, tmp_path: Path) -> None:
    one, two = run(1, tiny_model_dir, tmp_path / "one"), run(2, tiny_model_dir, tmp_path / "two")
    assert (one["world"], two["world"]) == (1, 2)
    assert one["outcomes"] == two["outcomes"] == ["published"] and one["version"] == two["version"] == "v000001"
    assert json.loads((tmp_path / "two" / "rank1.json").read_text()) == {"rounds": 1}
    a, b = torch.load(tmp_path / "one" / "weights.pt"), torch.load(tmp_path / "two" / "weights.pt")
    assert set(a) == set(b) and a
    moved = max(float(w.abs().max()) for k, w in a.items() if "lora_B" in k)  # LoRA B starts at zero
    apart = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved > 1e-3 and apart < 0.01 * moved


@pytest.mark.slow
def test_a_round_failing_on_rank_0_releases_the_others_and_the_next_round_works(tiny_model_dir: Path,
                                                                                 tmp_path: Path) -> None:
    out = tmp_path / "two"
    out.mkdir()
    (out / "fail_first").touch()
    result = run(2, tiny_model_dir, out)
    assert result["outcomes"] == ["rejected", "published"]
    assert result["reasons"][0] == "round failed: Unavailable: the reward service at test did not score"
    assert json.loads((out / "rank1.json").read_text()) == {"rounds": 1}  # left the failed one, trained in the next
