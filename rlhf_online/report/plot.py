"""The demo's PNG: the loop over time and the held-out verdict, six panels on one page."""

from __future__ import annotations

import math
from pathlib import Path

from rlhf_online.report.timeline import RoundRecord, Snapshot


def plot(path: Path, snapshots: list[Snapshot], rounds: list[RoundRecord], by_version: dict[str, list[int]],
         heldout: dict[str, dict[str, dict]], kl_budget: float, served: dict[str, list[int]] | None = None) -> None:
    """Write the figure to `path` (atomically: the caller passes a temp path and renames).

    by_version: version -> [thumbs up, ratings sent]; served (optional): version -> [noise-free thumbs up, replies].
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
    minutes = [s.t / 60 for s in snapshots]

    # (a) thumbs-up rate per policy version, in serving order
    _per_version(ax[0, 0], by_version, served or {})

    # (b) thumbs-up rate over time
    b = ax[0, 1]
    b.plot(minutes, [s.thumbs_up_rate for s in snapshots], label="cumulative", color="tab:blue")
    b.plot(minutes, _smooth([s.recent_thumbs_up_rate for s in snapshots]), label="recent", color="tab:cyan", alpha=0.8)
    for r in rounds:
        if r.outcome == "published":
            b.axvline(r.t / 60, color="tab:green", alpha=0.25, lw=1)
    for start, end in _canary_spans(snapshots):  # a canary serving its share of the users
        b.axvspan(start / 60, end / 60, color="tab:orange", alpha=0.12, lw=0)
    for prev, snap in zip(snapshots, snapshots[1:], strict=False):
        if snap.policy_version != prev.policy_version:  # every user on a new version: promoted or activated
            b.axvline(snap.t / 60, color="tab:purple", alpha=0.6, lw=1.5)
    b.set(title="Thumbs-up over time (green: published; orange: a canary live; purple: new stable)",
          xlabel="minutes", ylim=(0, 1))
    b.legend(loc="lower right")

    # (c) reward model accuracy over time
    c = ax[0, 2]
    c.step(minutes, [s.reward_accuracy for s in snapshots], where="post", color="tab:purple")
    c.axhline(0.5, color="grey", ls=":", lw=1)
    c.set(title="Reward model: held-out pairwise accuracy", xlabel="minutes", ylim=(0.3, 1))

    # (d) KL of each round's candidate; the colours are the gate's verdicts over time
    d = ax[1, 0]
    for outcome, color in (("published", "tab:green"), ("rejected", "tab:red")):
        rs = [r for r in rounds if r.outcome == outcome]
        d.scatter([r.t / 60 for r in rs], [r.kl for r in rs], color=color, label=f"{outcome} ({len(rs)})", zorder=3)
    d.axhline(kl_budget, color="tab:red", ls="--", lw=1, label=f"KL budget {kl_budget:g}")
    d.set(title="PPO rounds: held-out KL to the reference (nats/reply)", xlabel="minutes", ylim=(0, 1.1 * max([kl_budget, *(r.kl for r in rounds if math.isfinite(r.kl))])))
    d.legend(loc="upper left")

    # (e) and (f): the held-out verdict of the judges, base vs final, with 95% CIs (own scales)
    _verdict(ax[1, 1], heldout, [("toxicity", "toxicity probability")],
             "Held-out toxicity, lower is better (95% CI)", "%.4f")
    _verdict(ax[1, 2], heldout, [("sentiment", "sentiment (VADER)"), ("thumbs_up_rate", "users' thumbs-up rate")],
             "Held-out sentiment and thumbs-up (95% CI)", "%.3f")

    fig.suptitle("rlhf-online demo: simulated users' feedback -> reward model -> PPO -> hot-swapped adapters")
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


def _canary_spans(snapshots: list[Snapshot]) -> list[tuple[float, float]]:
    """(start, end) seconds of the stretches where the snapshots saw a canary live."""
    spans: list[tuple[float, float]] = []
    start = None
    for snap in snapshots:
        if snap.canary_version and start is None:
            start = snap.t
        elif not snap.canary_version and start is not None:
            spans.append((start, snap.t))
            start = None
    if start is not None:
        spans.append((start, snapshots[-1].t))
    return spans


def _per_version(a, by_version: dict[str, list[int]], served: dict[str, list[int]]) -> None:
    """Bars of the users' thumbs-up rate per version and, beside them when known, the noise-free rate of its traffic."""
    versions = sorted(set(by_version) | set(served), key=lambda v: (v != "", v))
    series = [("users' ratings", by_version, "tab:blue")] + ([("noise-free, all replies", served, "tab:orange")]
                                                              if served else [])
    width = 0.8 / len(series)
    for k, (label, counts, color) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(versions))]
        pairs = [counts.get(v, [0, 0]) for v in versions]
        bars = a.bar(xs, [up / n if n else 0 for up, n in pairs], width, color=color, label=label)
        for bar, (_, n) in zip(bars, pairs, strict=True):
            a.annotate(f"n={n}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                       fontsize=7)
    a.set_xticks(range(len(versions)), [v or "base" for v in versions], rotation=45)
    a.set(title="Thumbs-up rate per policy version", ylabel="thumbs up / replies", ylim=(0, 1))
    if served:
        a.legend(loc="best", fontsize=8)


def _verdict(ax, heldout: dict[str, dict[str, dict]], metrics: list[tuple[str, str]], title: str, fmt: str) -> None:
    """Grouped bars of base vs final for some metrics, with their bootstrap intervals as error bars."""
    width = 0.38
    for k, (label, color) in enumerate((("base", "tab:grey"), ("final", "tab:green"))):
        means = [heldout[label][m]["mean"] for m, _ in metrics]
        errs = [[means[i] - heldout[label][m]["ci95"][0] for i, (m, _) in enumerate(metrics)],
                [heldout[label][m]["ci95"][1] - means[i] for i, (m, _) in enumerate(metrics)]]
        xs = [i + (k - 0.5) * width for i in range(len(metrics))]
        ax.bar(xs, means, width, yerr=errs, capsize=4, color=color, label=label)
        for x, m, hi in zip(xs, means, errs[1], strict=True):
            ax.annotate(fmt % m, (x, m + hi), ha="center", va="bottom", fontsize=9, xytext=(0, 2),
                        textcoords="offset points")
    ax.set_xticks(range(len(metrics)), [name for _, name in metrics])
    ax.set_title(title)
    ax.legend(loc="upper left")


def _smooth(xs: list[float], k: int = 5) -> list[float]:
    """Trailing mean over the last k finite values (recent rates are noisy)."""
    out, window = [], []
    for x in xs:
        if x == x:
            window = [*window[-(k - 1):], x]
        out.append(sum(window) / len(window) if window else float("nan"))
    return out
