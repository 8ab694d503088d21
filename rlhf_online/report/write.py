"""report.json (its keys: docs/usage.md, "The demo") and report.md beside the plot, each written atomically."""

from __future__ import annotations

from pathlib import Path

from rlhf_online.artifacts import write_atomically, write_json_atomically
from rlhf_online.report.timeline import RoundRecord


def build_report(heldout: dict[str, dict[str, dict]], *, kl: float, kl_budget: float, rounds: list[RoundRecord],
                 wall_seconds: float, final_version: str, extra: dict) -> dict:
    """The machine-readable report: base and final means at the top level, CIs and the rest beside them."""
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
        **extra,
    }


def markdown(report: dict, rounds: list[RoundRecord], by_version: dict[str, list[int]]) -> str:
    """A human-readable report: verdict table, rounds table, thumbs per version."""
    b, f, ci = report["base"], report["final"], report["ci95"]
    lines = [f"# rlhf-online demo — {report['date']}", "",
             f"{report['machine']}; {report['minutes']:g} minutes of simulated users ({report['users']} users, "
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
              "| # | minute | outcome | version | held-out reward serving -> candidate | KL | seconds |",
              "|---:|---:|---|---|---|---:|---:|"]
    for i, r in enumerate(rounds, 1):
        lines.append(f"| {i} | {r.t / 60:.1f} | {r.outcome} | {r.version or '-'} | {r.reward_before:.3f} -> "
                     f"{r.reward_after:.3f} | {r.kl:.2f} | {r.seconds:.0f} |")
    lines += ["", "## Users' ratings per policy version", "", "| version | ratings | thumbs-up rate |", "|---|---:|---:|"]
    for v in sorted(by_version, key=lambda v: (v != "", v)):
        up, n = by_version[v]
        lines.append(f"| {v or 'base'} | {n} | {up / n if n else float('nan'):.2f} |")
    lines += ["", "![the loop over time](report.png)", ""]
    return "\n".join(lines)


def _ci(mean: float, ci: list[float]) -> str:
    return f"{mean:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"


def write(run_dir: Path, report: dict, md: str) -> None:
    """report.json and report.md, each replaced in one step."""
    write_json_atomically(run_dir / "report.json", report)
    write_atomically(run_dir / "report.md", lambda tmp: tmp.write_text(md))
