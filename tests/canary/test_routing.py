"""Canary routing: sticky per user, the configured share, interleaved candidates for n >= 2."""

from __future__ import annotations

import random

from rlhf_online.canary.routing import CanaryRouter, user_bucket


def test_users_are_sticky_and_the_share_is_the_configured_percent():
    router = CanaryRouter(20.0, random.Random(0))
    users = [f"user-{i}" for i in range(5000)]
    inside = [u for u in users if router.in_canary(u)]
    assert 0.18 < len(inside) / len(users) < 0.22
    assert all(router.in_canary(u) for u in inside[:50])  # asked again: the same answer
    assert all(0 <= user_bucket(u) < 100 for u in users[:100])
    assert not any(CanaryRouter(0.0).in_canary(u) for u in users[:200])
    assert all(CanaryRouter(100.0).in_canary(u) for u in users[:200])


def test_versions_per_candidate():
    router = CanaryRouter(50.0, random.Random(1))
    inside = next(u for u in (f"u{i}" for i in range(100)) if router.in_canary(u))
    outside = next(u for u in (f"u{i}" for i in range(100)) if not router.in_canary(u))
    assert router.versions(outside, 2, "v1", "v2") == ["v1", "v1"]
    assert router.versions(inside, 1, "v1", "v2") == ["v2"]
    assert router.versions(inside, 3, "v1", "") == ["v1"] * 3  # no canary live
    assert router.versions(inside, 1, "v1", "v1") == ["v1"]  # promoted, CANARY not yet cleared
    orders = {tuple(router.versions(inside, 2, "v1", "v2")) for _ in range(50)}
    assert orders == {("v1", "v2"), ("v2", "v1")}  # one of each, in random order
    assert sorted(router.versions(inside, 4, "v1", "v2")) == ["v1", "v1", "v2", "v2"]


def test_anonymous_requests_draw_the_share_at_random():
    router = CanaryRouter(30.0, random.Random(2))
    share = sum(router.in_canary("") for _ in range(4000)) / 4000
    assert 0.27 < share < 0.33
