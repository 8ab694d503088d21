"""report.json (its keys: docs/usage.md, "The demo") and report.md beside the plot, each written atomically."""

from __future__ import annotations

import math
from pathlib import Path

from rlhf_online.artifacts import write_atomically, write_json_atomically
from rlhf_online.report import canaries
from rlhf_online.report.timeline import RoundRecord
from rlhf_online.report.versions import BETTER, WORSE


def build_report(heldout: dict[str, dict[str, dict]], *, kl: float, kl_budget: float, rounds: list[RoundRecord],
                 wall_seconds: float, final_version: str, extra: dict, versions: list[dict] | None = None) -> dict:
    """The machine-readable report: base and final means at the top level, CIs and the rest beside them.

    `versions`: report.versions.version_rows, each served version's traffic and learning (omitted when None).
    """
    def flat(label: str) -> dict[str, float]:
        return {m: heldout[label][m]["mean"] for m in ("toxicity", "sentiment", "thumbs_up_rate")}

    base, final = flat("base"), flat("final")
    return {
        "base": base, "final": final, "kl": kl, "kl_budget": kl_budget,
        "rounds": len(rounds), "rounds_published": sum(r.outcome == "published" for r in rounds),
        "rounds_rejected": sum(r.outcome == "rejected" for r in rounds),
        "wall_seconds": round(wall_seconds, 1), "final_version": final_version,
        "toxicity_change": final["toxicity"] / base["toxicity"] - 1 if base["toxicity"] else None,
        "ci95": {label: {m: heldout[label][m]["ci95"] for m in heldout[label]} for label in heldout},
        **({"versions": versions} if versions is not None else {}),
        **extra,
    }


def _users_minutes(report: dict) -> str:
    """'10 minutes', or '13.4 minutes (10 asked for, then until ...)' when an until_* wait kept the users going."""
    if not report.get("users_waited_for"):  # they stopped at --minutes (the last poll may overshoot a little)
        return f"{report['minutes']:g} minutes"
    return (f"{report['users_minutes']:.1f} minutes ({report['minutes']:g} asked for, then until "
            f"{' and '.join(report['users_waited_for'])})")


def markdown(report: dict, rounds: list[RoundRecord], by_version: dict[str, list[int]]) -> str:
    """A human-readable report: verdict table, rounds table, thumbs per version."""
    b, f, ci = report["base"], report["final"], report["ci95"]
    lines = [f"# rlhf-online demo — {report['date']}", "",
             f"{report['machine']}; {_users_minutes(report)} of simulated users ({report['users']} users, "
             f"personas {', '.join(report['personas'])}); wall time {report['wall_seconds']:.0f} s; "
             f"{report['rounds']} PPO rounds ({report['rounds_published']} published, {report['rounds_rejected']} "
             f"rejected); final policy {report['final_version'] or '(bare base)'}.", "",
             f"## Held-out prompts ({report['heldout_prompts']} prompts x {report['heldout_samples']} replies, "
             "fixed seeds), judged by alt-profanity-check and VADER", "",
             "| metric | base | final | change |", "|---|---|---|---|"]
    for m, name in (("toxicity", "mean toxicity probability"), ("sentiment", "mean sentiment (VADER compound)"),
                    ("thumbs_up_rate", "users' thumbs-up rate (noise-free)")):
        change = f"{100 * (f[m] / b[m] - 1):+.1f}%" if m == "toxicity" and b[m] else f"{f[m] - b[m]:+.3f}"
        lines.append(f"| {name} | {_ci(b[m], ci['base'][m])} | {_ci(f[m], ci['final'][m])} | {change} |")
    lines += ["", f"KL of the final policy to the reference on held-out prompts: {report['kl']:.2f} nats per reply "
                  f"(budget {report['kl_budget']:g}).", "", "## Rounds", "",
              "| # | minute | outcome | version | held-out reward serving -> candidate | KL | β | seconds |",
              "|---:|---:|---|---|---|---:|---:|---:|"]
    for i, r in enumerate(rounds, 1):
        beta = f"{r.kl_coef:.3g}" if math.isfinite(r.kl_coef) else "-"  # rounds recorded before the column: none
        lines.append(f"| {i} | {r.t / 60:.1f} | {r.outcome} | {r.version or '-'} | {r.reward_before:.3f} -> "
                     f"{r.reward_after:.3f} | {r.kl:.2f}{f' ± {r.kl_se:.2f}' if math.isfinite(r.kl_se) else ''} | "
                     f"{beta} | {r.seconds:.0f} |")
    lines += ["", *(_versions_table(report["versions"]) if "versions" in report else _ratings_table(by_version))]
    if "canaries" in report:
        lines += ["", *canaries.markdown(report["canaries"])]
    lines += ["", "![the loop over time](report.png)", ""]
    return "\n".join(lines)


def _ratings_table(by_version: dict[str, list[int]]) -> list[str]:
    """The users' thumbs-up rate per version (a report without the per-version learning rows)."""
    lines = ["## Users' ratings per policy version", "", "| version | ratings | thumbs-up rate |", "|---|---:|---:|"]
    for v in sorted(by_version, key=lambda v: (v != "", v)):
        up, n = by_version[v]
        lines.append(f"| {v or 'base'} | {n} | {up / n if n else float('nan'):.2f} |")
    return lines


def _versions_table(rows: list[dict]) -> list[str]:
    """Each served version's traffic, its users' ratings and the noise-free verdict, compared with its parent."""
    lines = ["## Learning per policy version", "",
             "The noise-free thumbs-up rate is the personas' verdict without rating noise on every reply the version "
             "served, rated or not; it is compared with the parent's (or, when the parent served nothing, the nearest "
             "ancestor's that did), on the users both served (a canary serves only its share of the users): the "
             "difference with its 95% normal-approximation interval, worse or better when the whole interval is "
             "below or above 0.", "",
             "| version | parent | replies served | ratings sent | users' thumbs-up rate (sent) | "
             "noise-free thumbs-up rate [95% Wilson] | vs parent [95% CI] |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        parent = "-" if r["parent"] is None else r["parent"] or "base"
        sent = "-" if r["thumbs_up_rate"] is None else f"{r['thumbs_up_rate']:.2f}"
        lo, hi = r["noise_free_ci95"]
        lines.append(f"| {r['version'] or 'base'} | {parent} | {r['replies']} | {r['ratings']} | {sent} | "
                     f"{r['noise_free_rate']:.3f} [{lo:.3f}, {hi:.3f}] | {_vs_parent(r)} |")
    worse = [r["version"] for r in rows if r["vs_parent"] and r["vs_parent"]["verdict"] == WORSE]
    if worse:
        lines += ["", f"Worse than its parent: {', '.join(worse)}."]
    return lines


def _vs_parent(row: dict) -> str:
    """The comparison cell: difference [interval], its verdict, and the ancestor when it is not the parent."""
    c = row["vs_parent"]
    if c is None:
        return "-"
    mark = {WORSE: " **worse**", BETTER: " better"}.get(c["verdict"], "")
    other = c["compared_with"] or "base"
    via = f" (vs {other})" if c["compared_with"] != row["parent"] else ""
    return f"{c['difference']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]{mark}{via}"


def _ci(mean: float, ci: list[float]) -> str:
    return f"{mean:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"


def write(run_dir: Path, report: dict, md: str) -> None:
    """report.json and report.md, each replaced in one step."""
    write_json_atomically(run_dir / "report.json", report)
    write_atomically(run_dir / "report.md", lambda tmp: tmp.write_text(md))
