"""Store.add_ranking / list_rankings and rankings in the rating evidence, on every backend."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rlhf_online.errors import InvalidArgument, NotFound
from rlhf_online.store import CompletionRecord, RankingRecord, RatingEvidence, Store, open_store
from rlhf_online.store.migrations import LATEST


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A fresh, empty store of each backend."""
    with open_store(store_url) as s:
        yield s


def add(store: Store, *ids: str, prompt: str = "Say hi") -> None:
    """Log plain completions of one prompt with these ids."""
    store.add_completions([CompletionRecord(completion_id=c, prompt=prompt, messages=(), text=f"hi from {c}",
                                            policy_version="") for c in ids])


def test_a_ranking_is_stored_once_best_first(store: Store) -> None:
    add(store, "a", "b", "c", "d")
    assert store.add_ranking(["c", "a", "d", "b"], "u1") is True
    [r] = store.list_rankings()
    assert isinstance(r, RankingRecord) and r.completion_ids == ("c", "a", "d", "b") and r.user_id == "u1"
    assert r.created_at > 0 and store.count_rankings() == 1
    assert store.schema_version() == LATEST


def test_a_repeat_by_the_same_user_is_a_duplicate_in_any_order(store: Store) -> None:
    add(store, "a", "b", "c")
    assert store.add_ranking(["a", "b", "c"], "u1") is True
    assert store.add_ranking(["a", "b", "c"], "u1") is False
    assert store.add_ranking(["c", "b", "a"], "u1") is False  # the same candidates again: the first is kept
    assert store.add_ranking(["c", "b", "a"], "u2") is True  # another user's judgement counts
    assert store.add_ranking(["a", "b"], "u1") is True  # a different set of candidates
    assert [r.completion_ids for r in store.list_rankings()] == [("a", "b", "c"), ("c", "b", "a"), ("a", "b")]
    assert [r.user_id for r in store.list_rankings(after_seq=store.list_rankings()[0].seq, limit=1)] == ["u2"]


@pytest.mark.parametrize(("ids", "message"), [
    (["a"], "at least 2"),
    ([], "at least 2"),
    (["a", "b", "a"], "repeated: a"),
])
def test_malformed_rankings_name_the_field_and_store_nothing(store: Store, ids: list[str], message: str) -> None:
    add(store, "a", "b")
    with pytest.raises(InvalidArgument, match=message) as e:
        store.add_ranking(ids, "u1")
    assert e.value.field == "completion_ids"
    assert store.count_rankings() == 0


def test_unknown_ids_are_not_found_and_mixed_prompts_refused(store: Store) -> None:
    add(store, "a", "b")
    add(store, "x", prompt="Another prompt")
    with pytest.raises(NotFound, match="nope"):
        store.add_ranking(["a", "nope", "b"], "u1")
    with pytest.raises(InvalidArgument, match="different prompts") as e:
        store.add_ranking(["a", "b", "x"], "u1")
    assert e.value.field == "completion_ids"
    assert store.count_rankings() == 0
    assert store.rating_evidence(["a", "b", "x"]) == {}  # no member rows were left behind either


def test_chat_completions_rank_only_with_the_same_messages(store: Store) -> None:
    def chat(cid: str, content: str) -> CompletionRecord:
        return CompletionRecord(completion_id=cid, prompt="", messages=(("user", content),), text=cid,
                                policy_version="")

    store.add_completions([chat("m1", "hello"), chat("m2", "hello"), chat("m3", "bye")])
    assert store.add_ranking(["m2", "m1"], "u1") is True
    with pytest.raises(InvalidArgument, match="different prompts"):
        store.add_ranking(["m1", "m3"], "u1")


def test_rankings_are_rating_evidence_one_verdict_per_completion(store: Store) -> None:
    add(store, "a", "b", "c", "d")
    store.add_ranking(["a", "b", "c", "d"], "u1")  # places 0..3 of 4: +1, +1/3, -1/3, -1
    store.add_ranking(["b", "a"], "u2")  # places 0..1 of 2: +1, -1
    store.add_feedback("a", "u3", "thumbs_up")
    got = store.rating_evidence(["a", "b", "c", "d"])
    assert got["a"] == RatingEvidence(thumbs_up=1, ranked=2, ranked_net=pytest.approx(0.0))
    assert got["b"].ranked == 2 and got["b"].ranked_net == pytest.approx(1 + 1 / 3)
    assert got["c"] == RatingEvidence(ranked=1, ranked_net=pytest.approx(-1 / 3))
    assert got["d"].net == pytest.approx(-1.0) and got["d"].count == 1
    assert got["a"].count == 3 and got["a"].net == pytest.approx(1.0)
