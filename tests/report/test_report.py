"""The demo report's parts: judging, bootstrap intervals, the written report and the plot."""

from __future__ import annotations

import json
import random
import struct

import pytest

from rlhf_online.report import heldout, plot, write
from rlhf_online.report.timeline import RoundRecord, Snapshot


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_data():
    rng = random.Random(0)
    small = [rng.gauss(1.0, 1.0) for _ in range(50)]
    large = [rng.gauss(1.0, 1.0) for _ in range(2000)]
    m, lo, hi = heldout.bootstrap_ci(small)
    assert lo < m < hi and lo < 1.0 < hi
    _, lo2, hi2 = heldout.bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 3  # ~ 1/sqrt(n): 40x the data, ~6x narrower
    assert heldout.bootstrap_ci([0.5] * 10) == (0.5, 0.5, 0.5)


def test_judges_rank_a_rude_reply_below_a_kind_one():
    kind, rude = "Thank you so much, I really appreciate your help!", "Shut up, you stupid idiot."
    j = heldout.judge([kind, rude], ["polite", "positive"])
    assert j.toxicity[1] > 0.5 > j.toxicity[0]
    assert j.sentiment[0] > 0 > j.sentiment[1]
    assert j.thumbs_up == [1.0, 0.0]


def _summary(tox: float) -> dict:
    return {"toxicity": {"mean": tox, "ci95": [tox - 0.01, tox + 0.01]},
            "sentiment": {"mean": 0.3, "ci95": [0.25, 0.35]}, "thumbs_up_rate": {"mean": 0.7, "ci95": [0.6, 0.8]}}


def test_report_has_the_contract_keys_and_a_readable_png(tmp_path):
    summary = {"base": _summary(0.05), "final": _summary(0.03)}
    rounds = [RoundRecord(30, "published", "v000001", "ok", 2.0, 0.1, 0.3, 30),
              RoundRecord(60, "rejected", "", "dropped", 3.0, 0.3, 0.1, 31)]
    snaps = [Snapshot(t, 10, 15, 15, 3, 0.6, 0.6, "v000001" if t > 30 else "", "r000001", 0.7, 20,
                      int(t > 30), int(t > 60), 0) for t in (5, 35, 65)]
    by_version = {"": [6, 10], "v000001": [4, 5]}
    report = write.build_report(summary, kl=2.0, kl_budget=12, rounds=rounds, wall_seconds=90.0,
                                final_version="v000001",
                                extra={"date": "today", "machine": "m", "minutes": 1, "users": 2,
                                       "personas": ["polite"], "heldout_prompts": 4, "heldout_samples": 1})
    write.write(tmp_path, report, write.markdown(report, rounds, by_version))
    plot.plot(tmp_path / "report.png", snaps, rounds, by_version, summary, 12)
    data = json.loads((tmp_path / "report.json").read_text())
    for side in ("base", "final"):
        assert set(data[side]) == {"toxicity", "sentiment", "thumbs_up_rate"}
    assert data["rounds"] == 2 and data["rounds_published"] == 1 and data["kl"] == 2.0
    assert data["toxicity_change"] == pytest.approx(-0.4)
    md = (tmp_path / "report.md").read_text()
    assert "-40.0%" in md and "| 2 | 1.0 | rejected |" in md
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 1000 and height >= 600
