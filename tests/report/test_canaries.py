"""The report's canary rows: minutes since the start, the evidence, and promoted versions users rated worse."""

from __future__ import annotations

from rlhf_online.report import canaries


def test_rows_markdown_and_promoted_but_worse():
    records = [
        {"version": "v000002", "outcome": "promoted", "stable": "", "queued_at": 130.0, "live_at": 160.0,
         "decided_at": 220.0,
         "evidence": {"canary_up": 28, "canary_rated": 30, "stable_up": 20, "stable_rated": 35, "pair_wins": 25,
                      "pairs": 30}, "test": {"delta": 0.3, "delta_se": 0.08, "llr": 4.1}, "reason": "promote: ..."},
        {"version": "v000003", "outcome": "superseded", "reason": "v000004, trained from it, went live instead"},
        {"version": "v000004", "outcome": "rolled_back", "stable": "v000002", "live_at": 220.0, "decided_at": 280.0,
         "by": "operator", "reason": "by an operator"},
        {"version": "v000005", "outcome": "queued"},
    ]
    rows = canaries.canary_rows(records, t0=100.0, percent=50.0)
    assert [r["live_minute"] for r in rows] == [1.0, None, 2.0, None] and rows[0]["decided_minute"] == 2.0
    assert rows[0]["share_percent"] == 50.0 and rows[1]["share_percent"] is None
    assert rows[0]["pairs"] == 30 and rows[2]["canary_rated"] is None
    md = "\n".join(canaries.markdown(rows))
    assert "| v000002 | base | 50% | 0.5 | 1.0 | 2.0 | 28/30 | 20/35 | 25/30 | +30.0 [8.0] | 4.10 | promoted |" in md
    assert canaries.promotion_lag_minutes(rows) == [1.5] and "Published to CURRENT: 1.5 minutes" in md
    assert "rolled_back (operator)" in md and "- v000003: v000004, trained from it" in md
    worse = {"version": "v000002", "vs_parent": {"verdict": "worse"}}
    assert canaries.promoted_but_worse(rows, [worse]) == ["v000002"]
    assert canaries.promoted_but_worse(rows, [{**worse, "vs_parent": {"verdict": "better"}}]) == []
    assert "No candidate went through a canary" in canaries.markdown([])[2]


def test_the_plot_shades_the_stretches_a_canary_was_live():
    from rlhf_online.report.plot import _canary_spans
    from rlhf_online.report.timeline import Snapshot

    def snap(t: float, canary: str) -> Snapshot:
        return Snapshot(t, 0, 0, 0, 0, 0.5, 0.5, "", "", 0.6, 0, 0, 0, 0, canary_version=canary)

    seen = [snap(0, ""), snap(5, "v1"), snap(10, "v1"), snap(15, ""), snap(20, "v2"), snap(25, "v3")]
    assert _canary_spans(seen) == [(5, 15), (20, 25)]
    assert _canary_spans([]) == []
