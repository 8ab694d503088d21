"""One user cannot steer the reward model: each user's examples together weigh at most a share of all.

Each example (a thumbs rating, a preference, a ranking's pairs) belongs to the user who sent it; a
pair implied by two users' thumbs (one's up, another's down on the same prompt) belongs half to
each. With w_u a user's total weight, the rule caps every user at the same level T:

    effective w_u = min(w_u, T),  T the largest level with  T <= max_share * sum_v min(w_v, T)

so that no user holds more than `max_share` of the total, and users under the cap keep their
weight (water-filling; T is found by bisection). A user's examples are scaled by min(w_u, T) / w_u.
With fewer than 1 / max_share users the cap cannot hold for everyone (n users at equal weight
each hold 1/n); T is then the lightest user's weight: every user weighs the same, which is as
close to the cap as n users can get. max_share >= 1 turns the cap off.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class UserShares:
    """Where a training's data came from: how many users, and the largest one's share before and after the cap."""

    users: int
    largest_share: float  # of the raw weight (nan with no data)
    largest_share_capped: float  # after the cap

    def as_metrics(self) -> dict[str, float]:
        """For the reward model's manifest."""
        return {"users": float(self.users), "largest_user_share": self.largest_share,
                "largest_user_share_capped": self.largest_share_capped}


def cap_level(weights: Mapping[Hashable, float], max_share: float) -> float:
    """The level T of the module docstring (inf when nothing needs capping)."""
    total = sum(weights.values())
    if max_share >= 1 or total <= 0 or max(weights.values()) <= max_share * total:
        return float("inf")
    if len(weights) * max_share <= 1:
        return min(weights.values())
    lo, hi = 0.0, max(weights.values())  # g(T) = max_share * sum min(w, T) - T is >= 0 at lo, < 0 at hi
    for _ in range(100):
        mid = (lo + hi) / 2
        if max_share * sum(min(w, mid) for w in weights.values()) >= mid:
            lo = mid
        else:
            hi = mid
    return lo


def user_factors(weights: Mapping[Hashable, float], max_share: float) -> tuple[dict[Hashable, float], UserShares]:
    """Each user's scale factor min(w_u, T) / w_u, and the shares before and after."""
    level = cap_level(weights, max_share)
    factors = {u: (min(w, level) / w if w > 0 else 1.0) for u, w in weights.items()}
    total, capped_total = sum(weights.values()), sum(w * factors[u] for u, w in weights.items())
    largest = max(weights.values()) / total if total > 0 else float("nan")
    largest_capped = max(w * factors[u] for u, w in weights.items()) / capped_total if capped_total > 0 \
        else float("nan")
    return factors, UserShares(len(weights), largest, largest_capped)
