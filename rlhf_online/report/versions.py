"""Learning per published version: the users' noise-free thumbs-up rate on the traffic each served, vs its parent's.

The simulated users know their persona, so for every reply served (rated or not) the pool counts
whether the persona's hidden preference, without rating noise, says thumbs up. Each version's rate
gets a Wilson interval, and its difference to its parent's (the nearest ancestor that served any
traffic) a two-proportion normal-approximation interval: a version whose whole interval lies below
zero is "worse" than its parent, above zero "better".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist

WORSE, BETTER, UNCLEAR = "worse", "better", "no clear difference"


def _z(level: float) -> float:
    """The two-sided normal quantile of a confidence level (1.96 for 0.95)."""
    return NormalDist().inv_cdf((1 + level) / 2)


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n ((nan, nan) when n is 0)."""
    if n <= 0:
        return float("nan"), float("nan")
    z, p = _z(level), k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At k = 0 (k = n) the bound is exactly 0 (1); the formula leaves a rounding error beside it.
    return (0.0 if k == 0 else center - half), (1.0 if k == n else center + half)


def difference_interval(k1: int, n1: int, k2: int, n2: int, level: float = 0.95) -> tuple[float, float, float]:
    """(p1 - p2, low, high): the difference of two proportions and its normal-approximation interval."""
    if n1 <= 0 or n2 <= 0:
        return float("nan"), float("nan"), float("nan")
    p1, p2 = k1 / n1, k2 / n2
    half = _z(level) * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    return p1 - p2, p1 - p2 - half, p1 - p2 + half


def verdict(low: float, high: float) -> str:
    """"worse" when the whole interval of a difference is below 0, "better" when above, else no clear difference."""
    if high < 0:
        return WORSE
    if low > 0:
        return BETTER
    return UNCLEAR


def nearest_served_ancestor(version: str, parents: Mapping[str, str], served: Mapping[str, list[int]]) -> str | None:
    """The closest ancestor of `version` (its parent, the parent's parent, ...) that served replies; None if none."""
    seen = {version}
    current = version
    while current:  # "" (the bare base) has no parent
        current = parents.get(current, "")
        if current in seen:  # a malformed manifest chain: stop instead of looping
            return None
        seen.add(current)
        if served.get(current, [0, 0])[1] > 0:
            return current
    return None


def version_rows(served: Mapping[str, list[int]], rated: Mapping[str, list[int]], parents: Mapping[str, str],
                 level: float = 0.95, by_user: Mapping[str, Mapping[str, list[int]]] | None = None) -> list[dict]:
    """One row per version that served replies, base first: traffic, ratings, noise-free rate and the parent comparison.

    served: version -> [noise-free thumbs up, replies served]; rated: version -> [thumbs up, ratings sent];
    parents: version -> its parent in the adapter registry ("" = the bare base); by_user (optional):
    version -> user -> [noise-free thumbs up, replies]. With it, a version is compared with its parent
    on the users both served only: a canary serves a share of the users, who may rate unlike the rest.
    """
    rows = []
    for v in sorted((v for v in served if served[v][1] > 0), key=lambda v: (v != "", v)):
        ups, n = served[v]
        sent_up, sent = rated.get(v, [0, 0])
        lo, hi = wilson_interval(ups, n, level)
        row = {"version": v, "parent": parents.get(v, "") if v else None, "replies": n, "ratings": sent,
               "thumbs_up_rate": sent_up / sent if sent else None, "noise_free_thumbs_up": ups,
               "noise_free_rate": ups / n, "noise_free_ci95": [lo, hi], "vs_parent": None}
        ancestor = nearest_served_ancestor(v, parents, served) if v else None
        if ancestor is not None:
            mine, theirs, users = (ups, n), tuple(served[ancestor]), None
            if by_user is not None:
                common = sorted(set(by_user.get(v, {})) & set(by_user.get(ancestor, {})))
                if common:
                    mine = tuple(map(sum, zip(*(by_user[v][u] for u in common), strict=True)))
                    theirs = tuple(map(sum, zip(*(by_user[ancestor][u] for u in common), strict=True)))
                    users = len(common)
            diff, dlo, dhi = difference_interval(*mine, *theirs, level)
            row["vs_parent"] = {"compared_with": ancestor, "difference": diff, "ci95": [dlo, dhi],
                                "verdict": verdict(dlo, dhi), "users_compared": users}
        rows.append(row)
    return rows


def worse_than_parent(rows: list[dict]) -> list[dict]:
    """The rows whose noise-free rate is clearly below their parent's."""
    return [r for r in rows if r["vs_parent"] and r["vs_parent"]["verdict"] == WORSE]
