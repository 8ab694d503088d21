"""Feedback rate limits: a token bucket per user and per API key, in each replica's memory.

A bucket holds up to `burst` tokens and refills at `rate` per second; each rating, preference or
ranking takes one. Per replica: behind N replicas a client may reach N times the rate, which is
what a per-replica limit can promise without a shared counter (the reward model's per-user cap
bounds what any one user's feedback can do however much of it arrives).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

MAX_BUCKETS = 100_000  # least recently used buckets beyond this are forgotten (they were full, or nearly)


class RateLimiter:
    """Token buckets by key; `rate` 0 turns the limit off."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, max(burst, 1.0), clock
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._lock = threading.Lock()

    def allow(self, key: Hashable) -> bool:
        """Take one token from `key`'s bucket; False (and nothing taken) when it is empty."""
        if self.rate <= 0:
            return True
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
            while len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
            return allowed
