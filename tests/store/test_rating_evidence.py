"""Store.rating_evidence: what users said about each completion, on every backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import pg_schema

import rlhf_online.store.sql as sql
from rlhf_online.store import CompletionRecord, RatingEvidence, Store, open_store


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh, empty store of each backend (PostgreSQL: a schema of its own, dropped after)."""
    if request.param == "sqlite":
        with open_store(f"sqlite:///{tmp_path / 'store.db'}") as s:
            yield s
        return
    with pg_schema() as url, open_store(url) as s:
        yield s


def add(store: Store, *ids: str) -> None:
    """Log plain completions with these ids."""
    store.add_completions([CompletionRecord(completion_id=c, prompt="Say hi", messages=(), text=f"hi from {c}",
                                            policy_version="") for c in ids])


def test_counts_thumbs_and_both_sides_of_preferences(store: Store) -> None:
    add(store, "a", "b", "c", "quiet")
    for user in ("u1", "u2", "u3"):
        store.add_feedback("a", user, "thumbs_up")
    store.add_feedback("a", "u4", "thumbs_down")
    store.add_feedback("b", "u1", "thumbs_down")
    store.add_preference("a", "b", "u1")
    store.add_preference("a", "b", "u2")
    store.add_preference("c", "a", "u1")
    store.add_preference("a", "b", "u1")  # a repeat counts once
    got = store.rating_evidence(["a", "b", "c", "quiet", "not-in-the-store"])
    assert got == {
        "a": RatingEvidence(thumbs_up=3, thumbs_down=1, preferred=2, dispreferred=1),
        "b": RatingEvidence(thumbs_down=1, dispreferred=2),
        "c": RatingEvidence(preferred=1),
    }
    assert got["a"].count == 7 and got["b"].count == 3
    assert list(store.rating_evidence(["c", "b", "a", "c"])) == ["c", "b", "a"]  # the order first given


def test_nothing_asked_nothing_rated(store: Store) -> None:
    assert store.rating_evidence([]) == {}
    add(store, "a")
    assert store.rating_evidence(iter(["a"])) == {}


def test_many_ids_are_read_in_chunks(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sql, "IDS_PER_QUERY", 3)  # 10 ids: four IN queries of each kind
    ids = [f"c{i}" for i in range(10)]
    add(store, *ids)
    for i, cid in enumerate(ids):
        if i % 2:
            store.add_feedback(cid, "u1", "thumbs_up")
        if i:
            store.add_preference(cid, ids[i - 1], "u1")
    got = store.rating_evidence(ids)
    assert list(got) == ids
    for i, cid in enumerate(ids):
        assert got[cid] == RatingEvidence(thumbs_up=i % 2, preferred=int(i > 0), dispreferred=int(i < 9)), cid
