"""bench ingest end to end on the tiny model: every acknowledged rating is in the store afterwards."""

from __future__ import annotations

import json

import pytest
from support import bench_args

from rlhf_online.bench import ingest


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ingest_counts_ratings_and_finds_every_acknowledged_one_stored(tiny_model_dir, tmp_path):
    args = bench_args(ingest, "--base-model", str(tiny_model_dir), "--clients", "4", "--ratings-per-client", "30",
                      "--completions", "8", "--out", str(tmp_path))
    assert ingest.main(args) == 0
    r = json.loads((tmp_path / "ingest.json").read_text())
    assert r["ingest"]["calls"] == r["acknowledged"] == r["stored"] == 120 and r["acknowledged_but_lost"] == 0
    assert r["ingest"]["errors"] == r["get_policy"]["errors"] == 0 and r["get_policy"]["calls"] == 120
    assert "| SubmitFeedback |" in (tmp_path / "ingest.md").read_text()
