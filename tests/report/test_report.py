"""The demo report's parts: judging, bootstrap intervals, the written report and the plot."""

from __future__ import annotations

import json
import random
import struct

import pytest

from rlhf_online.report import heldout, plot, versions, write
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
    rounds = [RoundRecord(30, "published", "v000001", "ok", 2.0, 0.1, 0.3, 30, kl_se=0.4, kl_coef=0.0542),
              RoundRecord(60, "rejected", "", "dropped", 3.0, 0.3, 0.1, 31)]
    snaps = [Snapshot(t, 10, 15, 15, 3, 0.6, 0.6, "v000001" if t > 30 else "", "r000001", 0.7, 20,
                      int(t > 30), int(t > 60), 0) for t in (5, 35, 65)]
    by_version = {"": [6, 10], "v000001": [4, 5]}
    report = write.build_report(summary, kl=2.0, kl_budget=12, rounds=rounds, wall_seconds=90.0,
                                final_version="v000001",
                                extra={"date": "today", "machine": "m", "minutes": 1, "users": 2,
                                       "personas": ["polite"], "heldout_prompts": 4, "heldout_samples": 1})
    write.write(tmp_path, report, write.markdown(report, rounds, by_version))
    plot.plot(tmp_path / "report.png", snaps, rounds, by_version, summary, 12, {"": [7, 12], "v000001": [4, 6]})
    data = json.loads((tmp_path / "report.json").read_text())
    for side in ("base", "final"):
        assert set(data[side]) == {"toxicity", "sentiment", "thumbs_up_rate"}
    assert data["rounds"] == 2 and data["rounds_published"] == 1 and data["kl"] == 2.0
    assert data["toxicity_change"] == pytest.approx(-0.4)
    md = (tmp_path / "report.md").read_text()
    assert "-40.0%" in md and "| 2 | 1.0 | rejected |" in md
    # the KL with its standard error where given, and the round's beta ("-" where the trainer gave none)
    assert "| 2.00 ± 0.40 | 0.0542 | 30 |" in md and "| 3.00 | - | 31 |" in md
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 1000 and height >= 600


def test_wilson_interval_matches_hand_computed_values():
    # 8/20: p = 0.4, z = 1.95996, center (0.4 + z^2/40) / (1 + z^2/20) = 0.41611, half-width 0.19731.
    assert versions.wilson_interval(8, 20) == pytest.approx((0.2188, 0.6134), abs=1e-4)
    assert versions.wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert versions.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert versions.wilson_interval(0, 10)[0] == 0.0 and versions.wilson_interval(10, 10)[1] == 1.0
    lo, hi = versions.wilson_interval(0, 0)
    assert lo != lo and hi != hi  # nan: no data, no interval


def test_difference_interval_and_verdict_match_hand_computed_values():
    # 0.3 - 0.5 = -0.2, se = sqrt(0.3*0.7/100 + 0.5*0.5/100) = 0.067823, half-width 1.95996 * se = 0.13293.
    d, lo, hi = versions.difference_interval(30, 100, 50, 100)
    assert (d, lo, hi) == pytest.approx((-0.2, -0.3329, -0.0671), abs=1e-4)
    assert versions.verdict(lo, hi) == "worse"
    assert versions.verdict(-hi, -lo) == "better"
    assert versions.verdict(*versions.difference_interval(48, 100, 50, 100)[1:]) == "no clear difference"


def _learning_rows() -> list[dict]:
    # v000001 learned from the base, v000002 regressed; v000003 served nothing, so v000004 faces v000002.
    served = {"": [50, 100], "v000001": [70, 100], "v000002": [30, 100], "v000003": [0, 0], "v000004": [60, 100]}
    rated = {"": [25, 50], "v000001": [33, 50], "v000002": [14, 50], "v000004": [31, 50]}
    parents = {"v000001": "", "v000002": "v000001", "v000003": "v000002", "v000004": "v000003"}
    return versions.version_rows(served, rated, parents)


def test_each_served_version_is_compared_with_its_nearest_served_ancestor():
    rows = {r["version"]: r for r in _learning_rows()}
    assert list(rows) == ["", "v000001", "v000002", "v000004"]  # v000003 served no replies
    assert rows[""]["parent"] is None and rows[""]["vs_parent"] is None
    assert rows["v000001"]["vs_parent"]["verdict"] == "better"
    assert rows["v000002"]["vs_parent"]["compared_with"] == "v000001"
    assert rows["v000002"]["vs_parent"]["difference"] == pytest.approx(-0.4)
    assert rows["v000002"]["vs_parent"]["verdict"] == "worse"
    assert rows["v000004"]["parent"] == "v000003" and rows["v000004"]["vs_parent"]["compared_with"] == "v000002"
    assert (rows["v000002"]["replies"], rows["v000002"]["ratings"], rows["v000002"]["thumbs_up_rate"]) == (100, 50, 0.28)
    assert rows["v000002"]["noise_free_ci95"] == pytest.approx(versions.wilson_interval(30, 100))
    assert [r["version"] for r in versions.worse_than_parent(list(rows.values()))] == ["v000002"]
    # An ancestor chain that loops (a corrupt manifest) ends the search instead of hanging.
    assert versions.nearest_served_ancestor("v000001", {"v000001": "v000002", "v000002": "v000001"}, {}) is None


def test_the_markdown_shows_a_version_worse_than_its_parent(tmp_path):
    summary = {"base": _summary(0.05), "final": _summary(0.03)}
    report = write.build_report(summary, kl=2.0, kl_budget=12, rounds=[], wall_seconds=90.0, final_version="v000004",
                                extra={"date": "today", "machine": "m", "minutes": 1, "users": 2,
                                       "personas": ["polite"], "heldout_prompts": 4, "heldout_samples": 1},
                                versions=_learning_rows())
    write.write(tmp_path, report, write.markdown(report, [], {}))
    assert [r["version"] for r in json.loads((tmp_path / "report.json").read_text())["versions"]] == [
        "", "v000001", "v000002", "v000004"]
    md = (tmp_path / "report.md").read_text()
    table = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "worse" in table["v000002"] and "-0.400" in table["v000002"] and "| v000001 |" in table["v000002"]
    assert "better" in table["v000001"] and "worse" not in table["v000001"]
    assert "(vs v000002)" in table["v000004"] and table["base"].rstrip().endswith("| - |")
    assert "Worse than its parent: v000002." in md


def test_a_canary_is_compared_with_its_parent_on_the_users_both_served():
    """A canary served to a share of generous users must not look better than its parent for that alone."""
    served = {"": [100, 200], "v000001": [90, 100]}
    by_user = {"": {"generous": [90, 100], "harsh": [10, 100]}, "v000001": {"generous": [90, 100]}}
    naive = versions.version_rows(served, {}, {"v000001": ""})[1]["vs_parent"]
    fair = versions.version_rows(served, {}, {"v000001": ""}, by_user=by_user)[1]["vs_parent"]
    assert naive["verdict"] == "better" and naive["users_compared"] is None
    assert fair["difference"] == pytest.approx(0.0) and fair["verdict"] == "no clear difference"
    assert fair["users_compared"] == 1
