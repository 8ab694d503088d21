"""bench soak end to end on the tiny model: steady load, swaps served, every acknowledged rating stored, clean exit."""

from __future__ import annotations

import argparse
import json

import pytest

from rlhf_online.bench import soak


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_short_soak_serves_every_swap_and_loses_no_feedback(tiny_model_dir, tmp_path):
    p = argparse.ArgumentParser()
    soak.add_arguments(p)
    args = p.parse_args(["--base-model", str(tiny_model_dir), "--seconds", "8", "--rate", "2", "--clients", "2",
                         "--swap-every", "3", "--adapter-poll-seconds", "0.5", "--max-new-tokens", "4",
                         "--torch-threads", "1", "--dtype", "float32", "--out", str(tmp_path)])
    soak.main(args)  # PASS or FAIL: the rate and memory bounds depend on the machine's load, not checked here
    r = json.loads((tmp_path / "soak.json").read_text())["run"]
    assert r["generate_ok"] > 0 and r["generate_failed"] == r["feedback_failed"] == 0, r["failures_by_code"]
    assert r["feedback_ok"] == r["generate_ok"] and r["feedback_lost"] == 0
    assert len(r["swaps"]) >= 2 and r["swaps_ok"] == len(r["swaps"])  # the warm-up's version and at least one more
    assert [s["version"] for s in r["swaps"]][:2] == ["v000001", "v000002"]
    # every answered request is in flight during a swap, during a placebo window, or neither
    groups = ("latency_during_swaps", "latency_during_placebo", "latency_outside_swaps")
    assert sum(r[g]["count"] for g in groups) == r["generate_ok"]
    assert r["rss_start_mb"] > 0 and r["server_exit_code"] == 0  # drained and exited 0 on SIGTERM
    assert "| server exit code after SIGTERM | 0 |" in (tmp_path / "soak.md").read_text()


def test_requests_are_grouped_by_the_swap_or_placebo_window_they_met():
    # a swap served between 10.0 and 10.4 s; its placebo window, 5 s later, 15.0-15.4 s
    spans = [(9.0, 10.2), (10.5, 11.0), (14.0, 15.1), (15.3, 17.0), (16.0, 16.5), (8.0, 16.0)]
    during, placebo, outside = soak.latency_by_window(spans, [(10.0, 10.4)], 5.0)
    assert during == pytest.approx([1.2, 8.0])  # the long one met both windows: in flight during the swap
    assert placebo == pytest.approx([1.1, 1.7]) and outside == pytest.approx([0.5, 0.5])
