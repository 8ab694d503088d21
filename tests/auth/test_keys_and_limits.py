"""API keys (create, verify, revoke, cache), rate limits and the served-to check, on the library alone."""

from __future__ import annotations

import pytest

from rlhf_online.auth.guard import FeedbackGuard
from rlhf_online.auth.keys import KeyAuthenticator, create_key, digest
from rlhf_online.auth.limits import RateLimiter
from rlhf_online.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated
from rlhf_online.store import CompletionRecord, Rater, open_store


@pytest.fixture
def store(store_url_any):
    with open_store(store_url_any) as s:
        yield s


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url_any(request, tmp_path):
    from support import pg_schema

    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    with pg_schema() as url:
        yield url


def test_a_key_is_stored_hashed_verified_and_revoked(store):
    record, key = create_key(store, "acme")
    assert key.startswith(f"rlhf_{record.key_id}_") and key.split("_")[2] not in str(store.list_api_keys())
    assert store.get_api_key(record.key_id).secret_sha256 == digest(key.split("_")[2])
    auth = KeyAuthenticator(store, cache_seconds=0)
    who = auth.identify(key)
    assert (who.tenant, who.role, who.annotator) == ("acme", "user", False)
    assert who.rater == Rater("acme", "user")
    for bad, why in [("", "required"), ("hunter2", "not an API key"), (key[:-1] + "0" if not key.endswith("0") else
                     key[:-1] + "1", "wrong"), (f"rlhf_{'0' * 12}_{'0' * 64}", "unknown")]:
        with pytest.raises(Unauthenticated, match=why):
            auth.identify(bad)
    assert store.revoke_api_key(record.key_id) is True and store.revoke_api_key(record.key_id) is False
    with pytest.raises(Unauthenticated, match="revoked"):
        auth.identify(key)
    _, annotator = create_key(store, "lab", "annotator")
    assert auth.identify(annotator).annotator
    with pytest.raises(InvalidArgument, match="role"):
        create_key(store, "acme", "admin")
    with pytest.raises(InvalidArgument, match="tenant"):
        create_key(store, "")


def test_the_cache_serves_a_revoked_key_only_until_it_expires(store):
    record, key = create_key(store, "acme")
    auth = KeyAuthenticator(store, cache_seconds=3600)
    auth.identify(key)
    store.revoke_api_key(record.key_id)
    assert auth.identify(key).tenant == "acme"  # within the cache time, as documented
    auth.cache_seconds = 0
    with pytest.raises(Unauthenticated, match="revoked"):
        auth.identify(key)


def test_token_buckets_refill_at_the_rate_and_are_per_key():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")  # another user's bucket is full
    now[0] = 0.5  # one token back
    assert limiter.allow("a") and not limiter.allow("a")
    assert all(RateLimiter(0, 1).allow("x") for _ in range(1000))  # rate 0: no limit


def test_the_guard_lets_users_rate_only_what_was_served_to_them(store):
    store.add_completions([CompletionRecord(completion_id="mine", prompt="p", messages=(), text="t", policy_version="",
                                            user_id="alice", tenant="acme"),
                           CompletionRecord(completion_id="bobs", prompt="p", messages=(), text="t", policy_version="",
                                            user_id="bob", tenant="acme"),
                           CompletionRecord(completion_id="other-tenant", prompt="p", messages=(), text="t",
                                            policy_version="", user_id="alice", tenant="globex")])
    auth = KeyAuthenticator(store)
    alice = auth.identify(create_key(store, "acme")[1])
    labeller = auth.identify(create_key(store, "lab", "annotator")[1])
    guard = FeedbackGuard(store)
    assert guard.check(alice, "alice", {"completion_id": "mine"}) == Rater("acme", "user")
    for cid in ("bobs", "other-tenant"):
        with pytest.raises(PermissionDenied, match=f"completion_id: completion '{cid}' was not served"):
            guard.check(alice, "alice", {"completion_id": cid})
    with pytest.raises(PermissionDenied, match="rejected_completion_id"):
        guard.check(alice, "alice", {"chosen_completion_id": "mine", "rejected_completion_id": "bobs"})
    assert guard.check(labeller, "anyone", {"completion_id": "bobs"}) == Rater("lab", "annotator")
    assert guard.check(None, "", {"completion_id": "bobs"}) == Rater()  # authentication off: no identity to check


def test_the_guard_limits_each_user_and_each_key(store):
    auth = KeyAuthenticator(store)
    key = auth.identify(create_key(store, "lab", "annotator")[1])
    guard = FeedbackGuard(store, RateLimiter(1e-9, 2), RateLimiter(1e-9, 3))
    store.add_completions([CompletionRecord(completion_id="c", prompt="p", messages=(), text="t", policy_version="")])
    guard.check(key, "u1", {"completion_id": "c"})
    guard.check(key, "u1", {"completion_id": "c"})
    with pytest.raises(ResourceExhausted, match="user_id: feedback rate limit of user 'u1'"):
        guard.check(key, "u1", {"completion_id": "c"})
    guard.check(key, "u2", {"completion_id": "c"})  # another user of the same key: its own bucket
    with pytest.raises(ResourceExhausted, match="x-api-key: feedback rate limit of API key"):
        guard.check(key, "u3", {"completion_id": "c"})  # but the key's bucket (3) is empty now
