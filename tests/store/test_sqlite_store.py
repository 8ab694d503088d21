"""The Store contract, run against every backend, plus the SQLite-specific guarantees."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf_online.errors import ConfigError, InvalidArgument, NotFound, Unavailable
from rlhf_online.store import CompletionRecord, Store, open_store
from rlhf_online.store.migrations import LATEST, MIGRATIONS, SERIAL_PK, render
from rlhf_online.store.sqlite import SqliteStore


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """An open store, closed after the test."""
    with open_store(store_url) as s:
        yield s


def completion(cid: str, **overrides: object) -> CompletionRecord:
    """A plausible completion record with the given id."""
    fields: dict = {"completion_id": cid, "prompt": "Say hi", "messages": (), "text": "hi!", "policy_version": "v000001"}
    fields.update(overrides)
    return CompletionRecord(**fields)


def sqlite_path(url: str) -> str:
    """The file behind a sqlite:/// URL."""
    return url[len("sqlite:///"):]


# ---------------------------------------------------------------------- contract (every backend)


def test_completion_round_trip(store: Store) -> None:
    rec = completion("c1", prompt="", messages=(("system", "be brief"), ("user", "Hi there")), user_id="u1",
                     params={"temperature": 0.7, "top_p": 0.9, "seed": None, "stop": ["\n"]}, prompt_tokens=12,
                     completion_tokens=3, finish_reason="eos", metadata={"app": "demo", "lang": "en"},
                     created_at=1_700_000_000.25)
    store.add_completions([rec])
    assert store.get_completion("c1") == rec
    assert store.count_completions() == 1


def test_created_at_zero_means_now(store: Store) -> None:
    store.add_completions([completion("c1")])
    assert store.get_completion("c1").created_at > 1_600_000_000


def test_duplicate_completion_rolls_back_the_whole_batch(store: Store) -> None:
    store.add_completions([completion("a")])
    with pytest.raises(InvalidArgument) as e:
        store.add_completions([completion("b"), completion("a")])
    assert e.value.field == "completion_id"
    with pytest.raises(NotFound):
        store.get_completion("b")
    assert store.count_completions() == 1
    store.add_completions([completion("b")])  # the failed batch left no transaction open
    assert store.count_completions() == 2


def test_unserialisable_params_are_invalid(store: Store) -> None:
    with pytest.raises(InvalidArgument) as e:
        store.add_completions([completion("a", params={"x": object()})])
    assert e.value.field == "params"


def test_unknown_completion_not_found(store: Store) -> None:
    with pytest.raises(NotFound) as e:
        store.get_completion("nope")
    assert (e.value.kind, e.value.ident) == ("completion", "nope")


def test_feedback_is_idempotent(store: Store) -> None:
    store.add_completions([completion("c1")])
    assert store.add_feedback("c1", "u1", "thumbs_up", "nice") is True
    assert store.add_feedback("c1", "u1", "thumbs_down", "changed my mind") is False
    assert store.count_feedback() == 1
    [fb] = store.list_feedback()
    assert (fb.completion_id, fb.user_id, fb.rating, fb.comment) == ("c1", "u1", "thumbs_up", "nice")
    assert store.add_feedback("c1", "u2", "thumbs_down") is True  # another user counts separately
    assert store.count_feedback() == 2


def test_feedback_on_unknown_completion(store: Store) -> None:
    with pytest.raises(NotFound) as e:
        store.add_feedback("ghost", "u1", "thumbs_up")
    assert (e.value.kind, e.value.ident) == ("completion", "ghost")
    assert store.count_feedback() == 0


def test_bad_rating(store: Store) -> None:
    store.add_completions([completion("c1")])
    with pytest.raises(InvalidArgument) as e:
        store.add_feedback("c1", "u1", "meh")
    assert e.value.field == "rating"
    assert store.count_feedback() == 0


def test_list_feedback_incrementally(store: Store) -> None:
    store.add_completions([completion(f"c{i}") for i in range(5)])
    for i in range(5):
        store.add_feedback(f"c{i}", "u", "thumbs_up" if i % 2 else "thumbs_down")
    first = store.list_feedback(limit=2)
    assert [f.completion_id for f in first] == ["c0", "c1"]
    rest = store.list_feedback(after_seq=first[-1].seq)
    assert [f.completion_id for f in rest] == ["c2", "c3", "c4"]
    assert store.list_feedback(after_seq=rest[-1].seq) == []
    seqs = [f.seq for f in first + rest]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5


def test_list_completions_oldest_first(store: Store) -> None:
    store.add_completions([completion("late", created_at=300.0), completion("early", created_at=100.0),
                           completion("mid", created_at=200.0)])
    assert [c.completion_id for c in store.list_completions()] == ["early", "mid", "late"]
    assert [c.completion_id for c in store.list_completions(after_created_at=100.0)] == ["mid", "late"]
    assert [c.completion_id for c in store.list_completions(limit=1)] == ["early"]
    with pytest.raises(InvalidArgument) as e:
        store.list_completions(limit=-1)
    assert e.value.field == "limit"


def test_preferences(store: Store) -> None:
    store.add_completions([completion("a"), completion("b")])
    assert store.add_preference("a", "b", "u1") is True
    assert store.add_preference("a", "b", "u1") is False
    assert store.add_preference("b", "a", "u1") is True  # the reverse is a different judgement
    prefs = store.list_preferences()
    assert [(p.chosen_completion_id, p.rejected_completion_id, p.user_id) for p in prefs] == [
        ("a", "b", "u1"), ("b", "a", "u1")]
    assert store.list_preferences(after_seq=prefs[0].seq) == prefs[1:]
    assert store.count_preferences() == 2  # the repeat was counted once


def test_preference_against_itself(store: Store) -> None:
    store.add_completions([completion("a")])
    with pytest.raises(InvalidArgument) as e:
        store.add_preference("a", "a", "u1")
    assert e.value.field == "rejected_completion_id"


@pytest.mark.parametrize(("chosen", "rejected", "missing"), [("a", "ghost", "ghost"), ("ghost", "a", "ghost")])
def test_preference_with_unknown_completion(store: Store, chosen: str, rejected: str, missing: str) -> None:
    store.add_completions([completion("a")])
    with pytest.raises(NotFound) as e:
        store.add_preference(chosen, rejected, "u1")
    assert (e.value.kind, e.value.ident) == ("completion", missing)
    assert store.list_preferences() == []


def test_reopen_keeps_data_and_version(store_url: str) -> None:
    with open_store(store_url) as s:
        assert s.schema_version() == LATEST
        s.add_completions([completion("c1")])
        s.add_feedback("c1", "u1", "thumbs_up")
    with open_store(store_url) as s:
        assert s.schema_version() == LATEST
        assert s.get_completion("c1").text == "hi!"
        assert s.count_feedback() == 1


def test_concurrent_feedback_loses_nothing(store: Store) -> None:
    threads_n, per_thread = 8, 40
    store.add_completions([completion(f"c{i}") for i in range(per_thread)])
    results: list[list[bool]] = [[] for _ in range(threads_n)]
    start = threading.Barrier(threads_n)

    def work(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            results[t].append(store.add_feedback(f"c{i}", f"user{t}", "thumbs_up"))
            # Every thread also races on the same (completion, user): exactly one may win.
            results[t].append(store.add_feedback("c0", "everyone", "thumbs_down"))
            store.add_completions([completion(f"t{t}-{i}")])

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sum(map(sum, results)) == threads_n * per_thread + 1
    assert store.count_feedback() == threads_n * per_thread + 1
    assert store.count_completions() == per_thread + threads_n * per_thread
    seqs = [f.seq for f in store.list_feedback()]
    assert len(set(seqs)) == len(seqs) == threads_n * per_thread + 1


def test_concurrent_ratings_share_commits_and_one_callers_error_stays_its_own(tmp_path: Path) -> None:
    """SQLite group commit: fewer transactions than ratings, each caller gets its own answer."""
    store = SqliteStore(tmp_path / "store.db")
    store.add_completions([completion(f"c{i}") for i in range(20)])
    transactions = []
    begin = store._transaction

    def counted():
        transactions.append(1)
        return begin()

    store._transaction = counted  # type: ignore[method-assign]
    threads_n, per_thread = 8, 50
    outcomes: list[list[object]] = [[] for _ in range(threads_n)]
    start = threading.Barrier(threads_n)

    def work(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            cid = "missing" if i % 10 == 9 else f"c{i % 20}"  # every tenth names no completion
            try:
                outcomes[t].append(store.add_feedback(cid, f"user{t}-{i // 20}", "thumbs_up"))
            except NotFound as e:
                outcomes[t].append(e)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    flat = [o for os_ in outcomes for o in os_]
    assert sum(isinstance(o, NotFound) for o in flat) == threads_n * per_thread // 10
    assert flat.count(True) == store.count_feedback() == threads_n * per_thread * 9 // 10
    assert len(transactions) < threads_n * per_thread  # several ratings went to disk in one commit
    store.close()


def test_a_failed_group_commit_fails_its_callers_and_hands_the_next_commit_on(tmp_path: Path) -> None:
    """A commit that fails as a whole answers its callers with the error; the callers queued behind it commit next."""
    store = SqliteStore(tmp_path / "store.db")
    store.add_completions([completion("c0")])
    begin = store._transaction
    inside, others = threading.Event(), 7

    def failing_first():
        if not inside.is_set():
            inside.set()
            deadline = time.monotonic() + 60
            while len(store._queue) < others and time.monotonic() < deadline:  # the others queue behind this one
                time.sleep(0.001)
            raise sqlite3.OperationalError("disk I/O error")
        return begin()

    store._transaction = failing_first  # type: ignore[method-assign]
    outcomes: dict[int, object] = {}

    def work(t: int) -> None:
        try:
            outcomes[t] = store.add_feedback("c0", f"user{t}", "thumbs_up")
        except sqlite3.OperationalError as e:
            outcomes[t] = e

    workers = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(1 + others)]
    workers[0].start()
    assert inside.wait(timeout=60)  # caller 0 leads a commit on its way to disk ...
    for w in workers[1:]:
        w.start()  # ... and the others queue behind it
    for w in workers:
        w.join(timeout=60)
    assert not any(w.is_alive() for w in workers)  # nobody was left waiting for a wake-up
    assert isinstance(outcomes[0], sqlite3.OperationalError)
    assert [outcomes[t] for t in range(1, 1 + others)] == [True] * others
    assert store.count_feedback() == others  # the failed commit wrote nothing
    store.close()


def test_context_manager_closes(store_url: str) -> None:
    with open_store(store_url) as s:
        pass
    # SQLite's driver says "closed" itself; PostgreSQL's pool closed is the domain's Unavailable (a client
    # may retry on another replica). Neither is a silent reconnect or a result.
    closed = sqlite3.ProgrammingError if store_url.startswith("sqlite") else Unavailable
    with pytest.raises(closed, match="closed"):
        s.count_completions()
    s.close()  # closing twice is harmless


def test_get_completions_in_the_order_given_leaving_out_unknown_ids(store: Store) -> None:
    recs = {cid: completion(cid, text=f"reply {cid}", created_at=t) for t, cid in enumerate(["a", "b", "c"], 1)}
    store.add_completions(list(recs.values()))
    got = store.get_completions(["c", "ghost", "a", "c"])
    assert list(got) == ["c", "a"]  # first-given order, a repeat once, the unknown id left out
    assert got == {"c": recs["c"], "a": recs["a"]}
    assert store.get_completions(iter(["b"])) == {"b": store.get_completion("b")}
    assert store.get_completions([]) == {}


def test_get_completions_beyond_one_query(store: Store) -> None:
    from rlhf_online.store.sql import IDS_PER_QUERY

    n = 2 * IDS_PER_QUERY + 1  # three queries, the last of one id
    store.add_completions([completion(f"c{i:05d}") for i in range(n)])
    wanted = [f"c{i:05d}" for i in reversed(range(n))]
    got = store.get_completions(wanted)
    assert list(got) == wanted
    assert all(rec.completion_id == cid for cid, rec in got.items())


def test_recent_prompts(store: Store) -> None:
    prompts = ["b", "B", "a", "é", "Z", "_x", "a b", "b"]  # code-point order differs from any locale's
    store.add_completions([completion(f"c{i}", prompt=p, created_at=100.0 + i) for i, p in enumerate(prompts)])
    store.add_completions([completion("chat", prompt="", messages=(("user", "hi"),), created_at=150.0)])
    every = store.recent_prompts(100)
    assert every == ["B", "Z", "_x", "a", "a b", "b", "é"]
    assert every == sorted({c.prompt for c in store.list_completions() if c.prompt})
    # The newest 5 completions with a plain prompt (the newer chat one has none): "b" once.
    assert store.recent_prompts(5) == ["Z", "_x", "a b", "b", "é"]
    assert store.recent_prompts(0) == []


# ---------------------------------------------------------------------- migrations


def test_migration_versions_are_contiguous() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    for dialect in SERIAL_PK:
        assert not any("{" in render(s, dialect) for m in MIGRATIONS for s in m.statements)


def test_migrations_applied_once(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    for _ in range(3):
        SqliteStore(path).close()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT version, description FROM schema_migrations ORDER BY version").fetchall()
    assert rows == [(m.version, m.description) for m in MIGRATIONS]


def test_future_schema_version_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', 0)", (LATEST + 1,))
    with pytest.raises(ConfigError, match="newer"):
        SqliteStore(path)


# ---------------------------------------------------------------------- SQLite specifics


def test_wal_and_synchronous_full(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "p.db") as s:
        conn = s._db  # the store's own connection: synchronous is per connection
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0


def test_two_stores_on_one_file(tmp_path: Path) -> None:
    """Two replicas (here: two connections) writing the same file wait for each other, losing nothing."""
    path = tmp_path / "shared.db"
    stores = [SqliteStore(path), SqliteStore(path)]
    stores[0].add_completions([completion("c")])

    def work(t: int) -> None:
        for i in range(25):
            stores[t % 2].add_feedback("c", f"u{t}-{i}", "thumbs_up")

    workers = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert stores[1].count_feedback() == 100
    for s in stores:
        s.close()


# ---------------------------------------------------------------------- open_store URLs


def test_open_store_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///sub/dir/rel.db") as s:
        assert isinstance(s, SqliteStore)
    assert (tmp_path / "sub" / "dir" / "rel.db").is_file()


def test_open_store_absolute_path(tmp_path: Path) -> None:
    target = tmp_path / "made" / "abs.db"
    url = f"sqlite:///{target}"
    assert url.startswith("sqlite:////")
    with open_store(url) as s:
        s.add_completions([completion("c1")])
    assert target.is_file()


def test_open_store_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///:memory:") as s:
        s.add_completions([completion("c1")])
        assert s.count_completions() == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["", "mysql://db/x", "sqlite://rel.db", "sqlite:///", "/tmp/x.db"])
def test_open_store_bad_url(url: str) -> None:
    with pytest.raises(ConfigError, match="store_url"):
        open_store(url)


def test_unreachable_postgresql_is_a_config_error_without_the_password() -> None:
    from rlhf_online.store.postgres import PostgresStore

    with pytest.raises(ConfigError, match="store_url: cannot connect") as e:
        PostgresStore("postgresql://rlhf:s3cret@127.0.0.1:1/rlhf", connect_timeout=2)
    assert "s3cret" not in str(e.value) and "***" in str(e.value)
