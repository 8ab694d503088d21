"""compare_versions on every backend: a canary's and its stable's thumbs and their interleaved preferences, in a window."""

from __future__ import annotations

import pytest

from rlhf_online.errors import InvalidArgument
from rlhf_online.store import CompletionRecord, VersionComparison, open_store


def served(cid: str, version: str, at: float) -> CompletionRecord:
    return CompletionRecord(completion_id=cid, prompt="Say hi", messages=(), text="hi", policy_version=version,
                            created_at=at)


def test_thumbs_and_interleaved_preferences_per_version_since_the_canary_went_live(store_url: str) -> None:
    with open_store(store_url) as store:
        store.add_completions([served("old-s", "v1", 50.0),  # before the window: not counted
                               *(served(f"s{i}", "v1", 100.0 + i) for i in range(4)),
                               *(served(f"c{i}", "v2", 100.5 + i) for i in range(3)),
                               served("other", "v3", 101.0)])
        store.add_feedback("old-s", "u", "thumbs_down")
        for cid, rating in [("s0", "thumbs_up"), ("s1", "thumbs_down"), ("s2", "thumbs_down"), ("c0", "thumbs_up"),
                            ("c1", "thumbs_up"), ("c2", "thumbs_down"), ("other", "thumbs_up")]:
            store.add_feedback(cid, "u", rating)
        store.add_feedback("c0", "another user", "thumbs_up")  # every user's rating counts
        store.add_preference("c0", "s0", "u")  # canary won
        store.add_preference("c1", "s1", "u")  # canary won
        store.add_preference("s2", "c2", "u")  # stable won
        store.add_preference("s3", "s2", "u")  # both stable: not a comparison of the two
        store.add_preference("other", "c1", "u")  # another version: not counted
        store.add_preference("c0", "old-s", "u")  # the stable side is older than the window: not counted

        got = store.compare_versions("v2", "v1", after_created_at=99.0)
        assert got == VersionComparison(a_up=3, a_rated=4, b_up=1, b_rated=3, a_wins=2, pairs=3)
        flipped = store.compare_versions("v1", "v2", after_created_at=99.0)
        assert (flipped.a_up, flipped.a_rated, flipped.a_wins, flipped.pairs) == (1, 3, 1, 3)
        assert store.compare_versions("v2", "v1", after_created_at=200.0) == VersionComparison()
        with pytest.raises(InvalidArgument, match="b"):
            store.compare_versions("v1", "v1")


def test_same_users_counts_the_stable_thumbs_of_the_canarys_users_only(store_url: str) -> None:
    """A canary share of users who rate differently from the rest must be compared with themselves."""
    with open_store(store_url) as store:
        store.add_completions([
            CompletionRecord(completion_id="c-in", prompt="p", messages=(), text="x", policy_version="v2",
                             user_id="in", created_at=100.0),
            CompletionRecord(completion_id="s-in", prompt="p", messages=(), text="x", policy_version="v1",
                             user_id="in", created_at=100.0),
            *(CompletionRecord(completion_id=f"s-out{i}", prompt="p", messages=(), text="x", policy_version="v1",
                               user_id="out", created_at=100.0) for i in range(3))])
        for cid, rating in [("c-in", "thumbs_down"), ("s-in", "thumbs_down"), ("s-out0", "thumbs_up"),
                            ("s-out1", "thumbs_up"), ("s-out2", "thumbs_up")]:
            store.add_feedback(cid, "someone", rating)
        everyone = store.compare_versions("v2", "v1", 99.0)
        same = store.compare_versions("v2", "v1", 99.0, same_users=True)
        assert (everyone.b_up, everyone.b_rated) == (3, 4)
        assert (same.a_up, same.a_rated, same.b_up, same.b_rated) == (0, 1, 0, 1)
