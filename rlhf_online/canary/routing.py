"""Which policy version serves each candidate of a request while a canary is live.

A user is in the canary share when the hash of their user_id falls below `percent`: sticky, so a
user sees one version's behaviour rather than a mix, and every replica computes the same answer
without sharing state. An anonymous request (no user_id) has nothing to stick to and draws at
random. Inside the share, a request for n >= 2 candidates is interleaved: half its candidates come
from the canary and half from the stable version, in random order, so the user's preference
between them is a paired comparison of the two versions (the most sensitive evidence there is).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field


def user_bucket(user_id: str) -> float:
    """A user's fixed place in [0, 100), from a hash of their id (the same on every replica and restart)."""
    return int.from_bytes(hashlib.sha256(user_id.encode()).digest()[:8], "big") % 10_000 / 100


@dataclass
class CanaryRouter:
    """Assigns each candidate of a request to the stable or the canary version."""

    percent: float = 20.0  # share of users (or of anonymous requests) the canary serves
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def in_canary(self, user_id: str) -> bool:
        """Whether this user's requests go to the canary."""
        if not user_id:
            return self.rng.random() * 100 < self.percent
        return user_bucket(user_id) < self.percent

    def versions(self, user_id: str, n: int, stable: str, canary: str) -> list[str]:
        """The version of each of the n candidates: all stable, all canary (n = 1), or interleaved (n >= 2)."""
        if not canary or canary == stable or not self.in_canary(user_id):
            return [stable] * n
        if n == 1:
            return [canary]
        mixed = [canary if k % 2 == 0 else stable for k in range(n)]
        self.rng.shuffle(mixed)
        return mixed
