"""store.tail: incremental reads that skip no row, even one that commits after a later one (PostgreSQL)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from rlhf_online.store import CompletionRecord, Store, open_store
from rlhf_online.store.tail import SeqTail


def feedback_tail(store: Store, start_window: int | None = None, **kw: object) -> SeqTail:
    """A tail over the feedback table, as reward.window builds one."""
    return SeqTail(lambda after, limit: store.list_feedback(after, limit),
                   lambda limit: store.list_feedback(limit=limit, newest=True),
                   lambda seqs: store.list_feedback(seqs=seqs), start_window=start_window, **kw)


def completions(store: Store, n: int) -> list[str]:
    ids = [f"c{i}" for i in range(n)]
    store.add_completions([CompletionRecord(completion_id=c, prompt="p", messages=(), text="t", policy_version="",
                                            created_at=100.0 + i) for i, c in enumerate(ids)])
    return ids


def test_every_row_once_across_polls_and_pages(store_url: str) -> None:
    with open_store(store_url) as store:
        ids = completions(store, 25)
        tail = feedback_tail(store, page=4)  # small pages: one poll pages through many
        assert tail.poll() == []
        for cid in ids[:10]:
            store.add_feedback(cid, "u", "thumbs_up")
        first = tail.poll()
        assert [f.completion_id for f in first] == ids[:10]
        assert tail.poll() == []
        for cid in ids[10:]:
            store.add_feedback(cid, "u", "thumbs_down")
        assert [f.completion_id for f in tail.poll()] == ids[10:]
        assert tail.poll() == []


def test_start_window_reads_only_the_newest(store_url: str) -> None:
    with open_store(store_url) as store:
        ids = completions(store, 8)
        for cid in ids:
            store.add_feedback(cid, "u", "thumbs_up")
        tail = feedback_tail(store, start_window=3)
        assert [f.completion_id for f in tail.poll()] == ids[-3:]
        store.add_feedback(ids[0], "other", "thumbs_down")
        assert [(f.completion_id, f.user_id) for f in tail.poll()] == [(ids[0], "other")]
        assert not tail.gaps  # SQLite and PostgreSQL alike: nothing in flight, nothing missing


def test_newest_and_seqs_reads(store_url: str) -> None:
    with open_store(store_url) as store:
        ids = completions(store, 5)
        for cid in ids:
            store.add_preference(cid, ids[0] if cid != ids[0] else ids[1], "u")
        every = store.list_preferences()
        assert [p.seq for p in store.list_preferences(limit=2, newest=True)] == [p.seq for p in every[-2:]]
        picked = [every[3].seq, every[1].seq, 10**9]  # unknown seqs are left out; seq order
        assert [p.seq for p in store.list_preferences(seqs=picked)] == [every[1].seq, every[3].seq]
        assert store.list_rankings(seqs=[]) == []


def test_a_row_committed_after_a_later_one_is_read(tmp_path: object) -> None:
    """PostgreSQL draws seq at insert: the row holding the lower seq can commit last. The tail still reads it."""
    from support import pg_schema

    with pg_schema() as url, open_store(url) as writer_a, open_store(url) as writer_b, open_store(url) as reader:
        ids = completions(writer_a, 2)
        tail = feedback_tail(reader)
        assert tail.poll() == []
        with writer_a._transaction() as cur:  # A inserts first (the lower seq) and has not committed yet
            writer_a._execute(cur, "INSERT INTO feedback (completion_id, user_id, rating, comment, created_at) "
                                   "VALUES (?, ?, ?, ?, ?)", (ids[0], "slow", "thumbs_up", "", 1.0))
            writer_b.add_feedback(ids[1], "fast", "thumbs_down")  # B: the higher seq, committed
            seen = tail.poll()
            assert [f.user_id for f in seen] == ["fast"]
            mark = tail.mark
        # A commits now. Paging by `seq > the last seq seen` misses it; the tail does not.
        assert reader.list_feedback(after_seq=mark) == []
        late = tail.poll()
        assert [f.user_id for f in late] == ["slow"] and late[0].seq < seen[0].seq
        assert tail.poll() == [] and not tail.gaps


def test_a_gap_that_never_fills_is_given_up_after_the_timeout(tmp_path: object) -> None:
    """A duplicate rating draws a seq on PostgreSQL and writes nothing: the gap it leaves expires."""
    from support import pg_schema

    now = [0.0]
    with pg_schema() as url, open_store(url) as store:
        ids = completions(store, 2)
        tail = feedback_tail(store, gap_timeout=30.0, clock=lambda: now[0])
        store.add_feedback(ids[0], "u", "thumbs_up")
        assert not store.add_feedback(ids[0], "u", "thumbs_down")  # duplicate: a seq drawn, no row
        store.add_feedback(ids[1], "u", "thumbs_up")
        assert [f.completion_id for f in tail.poll()] == ids
        assert len(tail.gaps) == 1
        now[0] = 29.0
        assert tail.poll() == [] and len(tail.gaps) == 1
        now[0] = 31.0
        assert tail.poll() == [] and not tail.gaps


@dataclass(frozen=True)
class Row:
    seq: int


def test_poll_cost_is_the_new_rows_not_the_table() -> None:
    """Each poll asks for rows after the mark and for open gaps only (a fake table of 10,000 rows)."""
    table = {s: Row(s) for s in range(1, 10_001) if s != 5_000}  # 5000: in flight
    asked: list[tuple] = []

    def after(seq: int, limit: int | None) -> list[Row]:
        asked.append(("after", seq))
        return [table[s] for s in sorted(table) if s > seq][:limit]

    def by_seq(seqs: list[int]) -> list[Row]:
        asked.append(("seqs", tuple(seqs)))
        return [table[s] for s in seqs if s in table]

    tail = SeqTail(after, lambda n: [table[s] for s in sorted(table)][-n:], by_seq, start_window=100)
    assert [r.seq for r in tail.poll()] == list(range(9_901, 10_001))
    table[10_001] = Row(10_001)
    asked.clear()
    assert [r.seq for r in tail.poll()] == [10_001]
    assert asked == [("after", 10_000)]  # one page of what is new; no gap lookups
    assert not tail.gaps  # 5000 is below the window: never a gap


@pytest.mark.parametrize("page", [1, 3, 1000])
def test_gaps_fill_in_any_order(page: int) -> None:
    table: dict[int, Row] = {}
    tail = SeqTail(lambda seq, limit: [table[s] for s in sorted(table) if s > seq][:limit],
                   lambda n: [], lambda seqs: [table[s] for s in seqs if s in table], page=page)
    for s in (1, 4, 6):
        table[s] = Row(s)
    assert [r.seq for r in tail.poll()] == [1, 4, 6] and sorted(tail.gaps) == [2, 3, 5]
    table[5] = Row(5)
    table[7] = Row(7)
    assert [r.seq for r in tail.poll()] == [5, 7] and sorted(tail.gaps) == [2, 3]
    table[3], table[2] = Row(3), Row(2)
    assert [r.seq for r in tail.poll()] == [2, 3] and not tail.gaps
