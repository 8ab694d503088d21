"""The demo report's canaries: each candidate's way through the controller, with its evidence and outcome.

Rows come from the adapter registry's records (decisions/<version>.json, canary.controller); times
are minutes since the demo started. A canary's share is the generation service's canary_percent.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhf_online.report.versions import WORSE


def canary_rows(records: Sequence[dict], t0: float, percent: float) -> list[dict]:
    """One row per candidate record: version, outcome, minutes live and decided, the evidence, the reason."""
    def minute(key: str, record: dict) -> float | None:
        return round((record[key] - t0) / 60, 2) if record.get(key) is not None else None

    rows = []
    for r in records:
        e, test = r.get("evidence") or {}, r.get("test") or {}
        rows.append({"version": r["version"], "outcome": r.get("outcome", ""), "stable": r.get("stable"),
                     "share_percent": percent if "live_at" in r else None,
                     "queued_minute": minute("queued_at", r), "live_minute": minute("live_at", r),
                     "decided_minute": minute("decided_at", r),
                     "canary_up": e.get("canary_up"), "canary_rated": e.get("canary_rated"),
                     "stable_up": e.get("stable_up"), "stable_rated": e.get("stable_rated"),
                     "pair_wins": e.get("pair_wins"), "pairs": e.get("pairs"),
                     "delta": test.get("delta"), "delta_se": test.get("delta_se"), "llr": test.get("llr"),
                     "by": r.get("by", "controller"), "reason": r.get("reason", "")})
    return rows


def promoted_but_worse(canaries: Sequence[dict], versions: Sequence[dict]) -> list[str]:
    """Promoted versions whose served traffic the users rated worse than their parent's (noise-free, 95% CI)."""
    worse = {v["version"] for v in versions if v.get("vs_parent") and v["vs_parent"]["verdict"] == WORSE}
    return [c["version"] for c in canaries if c["outcome"] == "promoted" and c["version"] in worse]


def markdown(rows: Sequence[dict]) -> list[str]:
    """The report's canary section."""
    if not rows:
        return ["## Canaries", "", "No candidate went through a canary (canaries off, or no round published)."]
    lines = ["## Canaries", "",
             "Each published candidate serves its share of the users (sticky per user; their n=2 requests get one "
             "candidate of each version) until the sequential test on their ratings decides "
             "(rlhf_online/canary/sequential.py): thumbs up / rated on each side, interleaved pairs the canary won, "
             "the estimated thumbs-up difference in points with its standard error, the test statistic.", "",
             "| version | vs stable | share | published (min) | live (min) | decided (min) | canary up/rated | "
             "stable up/rated | pairs won | delta [se] | llr | outcome |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        delta = "-" if r["delta"] is None else f"{100 * r['delta']:+.1f} [{100 * (r['delta_se'] or 0):.1f}]"
        llr = "-" if r["llr"] is None else f"{r['llr']:.2f}"
        share = "-" if r["share_percent"] is None else f"{r['share_percent']:g}%"
        outcome = r["outcome"] + (" (operator)" if r["by"] == "operator" else "")
        lines.append(f"| {r['version']} | {r['stable'] or ('base' if r['stable'] == '' else '-')} | {share} | "
                     f"{_num(r['queued_minute'])} | {_num(r['live_minute'])} | {_num(r['decided_minute'])} | {_frac(r, 'canary_up', 'canary_rated')} | "
                     f"{_frac(r, 'stable_up', 'stable_rated')} | {_frac(r, 'pair_wins', 'pairs')} | {delta} | {llr} | "
                     f"{outcome} |")
    reasons = [f"- {r['version']}: {r['reason']}" for r in rows if r["reason"]]
    lag = promotion_lag_minutes(rows)
    waited = (["", f"Published to CURRENT: {', '.join(f'{m:.1f}' for m in lag)} minutes for the promoted versions "
                   "(the time canaries add before a candidate reaches everyone)."] if lag else [])
    return lines + waited + (["", "Reasons:", "", *reasons] if reasons else [])


def promotion_lag_minutes(rows: Sequence[dict]) -> list[float]:
    """For each promoted version: minutes from its publication to its promotion."""
    return [r["decided_minute"] - r["queued_minute"] for r in rows
            if r["outcome"] == "promoted" and r["queued_minute"] is not None and r["decided_minute"] is not None]


def _frac(row: dict, up: str, n: str) -> str:
    return "-" if row[n] is None else f"{row[up]}/{row[n]}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"
