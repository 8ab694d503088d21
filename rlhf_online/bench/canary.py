"""`rlhf-online bench canary`: the canary test's error rates and speed, on simulated users with known effects.

No model and no services: a simulation of the canary controller alone. The stable version's users
thumb up a completion with probability --stable-rate, the canary's with that plus the effect (−10 to
+10 points). Each request belongs to the canary share with probability --canary-percent (users have
no tastes of their own here, so a sticky user split is the same as a per-request one), and is an
n=2 interleaved pair with probability --pair-fraction:

- canary share, n=2: one canary and one stable candidate, both rated, and the user prefers the one
  it thumbed up (a coin flip on a tie) — the Bernoulli user of rlhf_online.canary.sequential;
- canary share, n=1: one canary rating;
- the rest: one or two stable ratings.

The stable side of the evidence is what the controller reads: every user's stable ratings (its
default, --stable-evidence all), or with --canary-same-users (--stable-evidence same-users) the
stable ratings of the canary's own users, i.e. of the stable candidates of their interleaved pairs,
falling back to every user's while those are fewer than MIN_SAME_USER_STABLE_RATINGS.

The controller looks after every --look-every ratings (any version's, as a polling controller
sees them arrive) and calls decide() on the counts so far; a canary still undecided at
--max-canary-ratings canary ratings is rolled back (timeout). The trials of one effect run together
on numpy arrays through the test's own statistic (sequential.estimate and friends), and each trial's
deciding look is checked against decide() itself.

Writes <out>/canary.json: false_promotion_rate (promoted share at −5 points; target ≤ 5%), power
(promoted share at +10 points; target ≥ 80%), and per effect the promote / rollback / timeout
shares and the median and p90 canary ratings and total ratings until the decision; and canary.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import numpy as np

from rlhf_online.bench.common import machine, write_report
from rlhf_online.canary.controller import MIN_SAME_USER_STABLE_RATINGS
from rlhf_online.canary.sequential import (
    PROMOTE,
    ROLLBACK,
    CanaryTestConfig,
    Evidence,
    canary_looks,
    decide,
    estimate,
    lean_promotes,
    log_likelihood_ratio,
)

# The targets the test's defaults are tuned to meet (with margin), at the effects they are read at.
FALSE_PROMOTION_EFFECT, FALSE_PROMOTION_MAX = -0.05, 0.05
POWER_EFFECT, POWER_MIN = 0.10, 0.80
COUNTS = ("canary_up", "canary_rated", "stable_up", "stable_rated", "pair_wins", "pairs")
# Kept beside COUNTS: the stable ratings of the canary's own users (the stable candidates of their pairs).
SAME_UP, SAME_RATED = len(COUNTS), len(COUNTS) + 1
BLOCK = 128  # requests simulated per step for the trials still undecided


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the simulation, and one per knob of the canary test (its defaults unless given)."""
    p.add_argument("--trials", type=int, default=5000, help="simulated canaries per effect")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stable-rate", type=float, default=0.7, help="the stable version's thumbs-up rate")
    p.add_argument("--effects", default="-0.10,-0.05,0,0.05,0.10",
                   help="comma-separated canary minus stable thumbs-up rates (write --effects=-0.1,0.1)")
    p.add_argument("--canary-percent", type=float, default=20.0, help="share of users served the canary")
    p.add_argument("--pair-fraction", type=float, default=0.5, help="share of requests that are n=2 pairs")
    p.add_argument("--look-every", type=int, default=10, help="the controller calls decide() every this many ratings")
    p.add_argument("--stable-evidence", choices=("all", "same-users"), default="all",
                   help="the stable ratings the test reads: everyone's (the controller's default) or, as with "
                        "--canary-same-users, the canary's own users'")
    p.add_argument("--max-canary-ratings", type=int, default=1000,
                   help="timeout: roll back a canary undecided after this many canary ratings")
    p.add_argument("--max-looks", type=int, default=0,
                   help="the controller's canary_max_looks: undecided after this many judged canary completions, "
                        "the test's lean decides (llr halfway to the promotion bound promotes); 0 = off")
    p.add_argument("--out", default="bench-results")
    test = p.add_argument_group("canary test (rlhf_online.canary.sequential.CanaryTestConfig)")
    for f in dataclasses.fields(CanaryTestConfig):
        test.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                          help=f.metadata["help"])


def simulate(effect: float, args: argparse.Namespace, config: CanaryTestConfig,
             rng: np.random.Generator) -> dict[str, Any]:
    """Run --trials canaries with this effect to their decision; their outcome shares and durations."""
    p_s, p_c = args.stable_rate, args.stable_rate + effect
    share, pair_fraction = args.canary_percent / 100, args.pair_fraction
    trials = args.trials
    outcome = np.full(trials, "", dtype=object)
    at_canary, at_total = np.zeros(trials, dtype=np.int64), np.zeros(trials, dtype=np.int64)
    active = np.arange(trials)
    counts = np.zeros((trials, len(COUNTS) + 2), dtype=np.int64)  # cumulative, in COUNTS order, then SAME_*
    ratings = np.zeros(trials, dtype=np.int64)
    truncated = np.zeros(trials, dtype=bool)  # decided by the lean at --max-looks
    while active.size:
        n = active.size
        canary = rng.random((n, BLOCK)) < share
        pair = rng.random((n, BLOCK)) < pair_fraction
        first = rng.random((n, BLOCK)) < np.where(canary, p_c, p_s)  # the (canary's, in the share) first candidate
        second = rng.random((n, BLOCK)) < p_s  # a pair's stable candidate (outside the share: a second stable one)
        coin = rng.random((n, BLOCK)) < 0.5
        # What each request adds to each count, in COUNTS order (cast: bool + bool is `or` in numpy).
        inc = np.stack([canary & first, canary, (~canary & first).astype(np.int64) + (pair & second),
                        (~canary).astype(np.int64) + pair,
                        canary & pair & ((first & ~second) | ((first == second) & coin)), canary & pair,
                        canary & pair & second, canary & pair], axis=-1)
        cum = counts[active, None, :] + np.cumsum(inc, axis=1, dtype=np.int64)  # (n, BLOCK, 8) after each request
        total = ratings[active, None] + np.cumsum(1 + pair, axis=1, dtype=np.int64)
        before = np.concatenate([ratings[active, None], total[:, :-1]], axis=1)
        look = total // args.look_every > before // args.look_every  # this request's ratings crossed a multiple
        c = [cum[..., i] for i in range(len(COUNTS))]
        if args.stable_evidence == "same-users":  # the controller's choice, look by look
            same = cum[..., SAME_RATED] >= MIN_SAME_USER_STABLE_RATINGS
            c[2], c[3] = np.where(same, cum[..., SAME_UP], c[2]), np.where(same, cum[..., SAME_RATED], c[3])
        delta, var = estimate(*c, config.pair_overlap)
        llr = log_likelihood_ratio(delta, var, config)
        looks_so_far = canary_looks(c[1], c[5], config.pair_overlap)
        judged = looks_so_far >= config.min_canary_ratings
        decided = look & judged & ((llr >= config.promote_at) | (llr <= config.rollback_at))
        timeout = look & (c[1] >= args.max_canary_ratings)
        lean = look & (looks_so_far >= args.max_looks) if args.max_looks else np.zeros_like(look)
        stop = decided | timeout | lean
        done = stop.any(axis=1)
        where = stop.argmax(axis=1)  # the first look that decided or timed out (0 where none did)
        for row in np.flatnonzero(done):
            trial, j = active[row], where[row]
            evidence = Evidence(**{name: int(c[i][row, j]) for i, name in enumerate(COUNTS)})
            verdict = decide(evidence, config).outcome
            expected = "continue" if not decided[row, j] else PROMOTE if llr[row, j] > 0 else ROLLBACK
            if verdict != expected:  # the arrays and decide() are one statistic: a mismatch is a bug, not noise
                raise RuntimeError(f"decide() said {verdict}, the simulation {expected}, on {evidence}")
            if decided[row, j]:
                outcome[trial] = verdict
            elif lean[row, j]:  # canary_max_looks: the lean decides as the controller does (no reward gain here,
                # so no hacking signature)
                outcome[trial], truncated[trial] = (PROMOTE if lean_promotes(llr[row, j], config) else ROLLBACK), True
            else:
                outcome[trial] = "timeout"  # the controller's deadline
            at_canary[trial], at_total[trial] = cum[row, j, 1], total[row, j]
        counts[active] = cum[:, -1, :]
        ratings[active] = total[:, -1]
        active = active[~done]
    shares = {k: float(np.mean(outcome == k)) for k in (PROMOTE, ROLLBACK, "timeout")}
    return {"effect": effect, "canary_rate": round(p_c, 6), **shares, "truncated": float(np.mean(truncated)),
            "promote_se": round(float(np.sqrt(shares[PROMOTE] * (1 - shares[PROMOTE]) / trials)), 4),
            **{f"{name}_{stat}": round(float(np.percentile(x, q)), 1) for name, x in
               (("canary_ratings", at_canary), ("total_ratings", at_total)) for stat, q in (("median", 50), ("p90", 90))}}


def main(args: argparse.Namespace) -> int:
    """Simulate every effect, then write canary.json and canary.md."""
    effects = [float(e) for e in args.effects.split(",") if e.strip()]
    bad = [e for e in effects if not 0 < args.stable_rate + e < 1]
    if not 0 < args.stable_rate < 1 or bad:
        raise SystemExit(f"--stable-rate {args.stable_rate} plus each effect must lie in (0, 1): {bad}")
    # At 100% every request is the canary's: the stable side of the evidence is then the stable candidates of
    # interleaved pairs only, so there must be some (the demo's setting: every user, every request a pair).
    if not 0 < args.canary_percent <= 100 or not 0 <= args.pair_fraction <= 1 \
            or (args.canary_percent == 100 and args.pair_fraction == 0):
        raise SystemExit("--canary-percent must be in (0, 100] and --pair-fraction in 0..1 (above 0 at 100%: "
                         "the stable version is then judged only in interleaved pairs)")
    if args.trials < 1 or args.look_every < 1 or args.max_canary_ratings < 1 or args.max_looks < 0:
        raise SystemExit("--trials, --look-every and --max-canary-ratings must be >= 1, --max-looks >= 0")
    config = CanaryTestConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CanaryTestConfig)})
    t0 = time.time()
    seeds = np.random.SeedSequence(args.seed).spawn(len(effects))
    rows = []
    for effect, seed in zip(effects, seeds, strict=True):
        rows.append(simulate(effect, args, config, np.random.default_rng(seed)))
        print(f"  effect {100 * effect:+.0f} points: promoted {rows[-1][PROMOTE]:.3f}", flush=True)
    by_effect = {round(r["effect"], 6): r for r in rows}
    fp, power = by_effect.get(FALSE_PROMOTION_EFFECT), by_effect.get(POWER_EFFECT)
    result = {
        "benchmark": "canary", "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": round(time.time() - t0, 1),
        "false_promotion_rate": fp[PROMOTE] if fp else None, "power": power[PROMOTE] if power else None,
        "power_canary_ratings_median": power["canary_ratings_median"] if power else None,
        "targets": {"false_promotion_effect": FALSE_PROMOTION_EFFECT, "false_promotion_max": FALSE_PROMOTION_MAX,
                    "power_effect": POWER_EFFECT, "power_min": POWER_MIN,
                    "met": bool(fp and power and fp[PROMOTE] <= FALSE_PROMOTION_MAX and power[PROMOTE] >= POWER_MIN)},
        "config": {**dataclasses.asdict(config), "promote_at": config.promote_at, "rollback_at": config.rollback_at},
        "simulation": {"trials": args.trials, "seed": args.seed, "stable_rate": args.stable_rate,
                       "canary_percent": args.canary_percent, "pair_fraction": args.pair_fraction,
                       "look_every": args.look_every, "max_canary_ratings": args.max_canary_ratings,
                       "max_looks": args.max_looks,
                       "stable_evidence": args.stable_evidence},
        "effects": rows,
    }
    write_report(args.out, "canary", result, table(result))
    return 0


def table(result: dict[str, Any]) -> list[str]:
    """The Markdown report."""
    s, c = result["simulation"], result["config"]
    lines = [f"Canary test on simulated Bernoulli users — {result['machine']}, {result['date']}", "",
             "| effect (points) | canary thumbs-up | promote | rollback | timeout | decided by the lean | canary "
             "ratings median / p90 | all ratings median / p90 |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["effects"]:
        lines.append(f"| {100 * r['effect']:+.0f} | {r['canary_rate']:.2f} | {r[PROMOTE]:.3f} | {r[ROLLBACK]:.3f} | "
                     f"{r['timeout']:.3f} | {r['truncated']:.3f} | {r['canary_ratings_median']:.0f} / {r['canary_ratings_p90']:.0f} | "
                     f"{r['total_ratings_median']:.0f} / {r['total_ratings_p90']:.0f} |")
    fp, power = result["false_promotion_rate"], result["power"]
    lines += ["", f"{s['trials']} trials per effect (seed {s['seed']}): stable thumbs-up {s['stable_rate']}, "
              f"{s['canary_percent']:g}% canary share, {s['pair_fraction']:g} of requests interleaved pairs, "
              f"decide() every {s['look_every']} ratings, rollback at {s['max_canary_ratings']} canary ratings, "
              f"{'the lean decides at ' + str(s['max_looks']) + ' judged canary completions, ' if s['max_looks'] else ''}"
              f"stable evidence: {s['stable_evidence']}. "
              f"Test: worse_by {c['worse_by']}, better_by {c['better_by']}, alpha {c['alpha']}, beta {c['beta']}, "
              f"min_canary_ratings {c['min_canary_ratings']}, pair_overlap {c['pair_overlap']}.",
              "", f"False promotion at {100 * FALSE_PROMOTION_EFFECT:+.0f} points: "
              f"{'n/a' if fp is None else f'{fp:.3f}'} (target <= {FALSE_PROMOTION_MAX}); power at "
              f"{100 * POWER_EFFECT:+.0f} points: {'n/a' if power is None else f'{power:.3f}'} (target >= {POWER_MIN}); "
              f"targets {'met' if result['targets']['met'] else 'NOT met'} ({result['seconds']:.1f} s)."]
    return lines
