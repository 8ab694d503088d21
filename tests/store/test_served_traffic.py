"""Migration 2 on every backend: completion token ids kept exactly, and completions read by the version that served them."""

from __future__ import annotations

from unittest import mock

from rlhf_online.store import CompletionRecord, Store, open_store
from rlhf_online.store import sql as sql_module
from rlhf_online.store.migrations import LATEST, MIGRATIONS


def record(cid: str, version: str, created_at: float, **overrides: object) -> CompletionRecord:
    """A completion served by `version` at `created_at`."""
    fields: dict = {"completion_id": cid, "prompt": "Say hi", "messages": (), "text": "hi!", "policy_version": version,
                    "created_at": created_at}
    fields.update(overrides)
    return CompletionRecord(**fields)


def test_token_ids_round_trip_exactly(store_url: str) -> None:
    rec = record("c1", "v000001", 100.0, prompt_token_ids=(1, 9, 49151, 0), token_ids=(17, 0, 2))
    with open_store(store_url) as store:
        store.add_completions([rec, record("c2", "v000001", 101.0)])
        assert store.get_completion("c1") == rec
        assert store.get_completion("c2").token_ids == () and store.get_completion("c2").prompt_token_ids == ()


def test_served_completions_by_version_newest_first(store_url: str) -> None:
    with open_store(store_url) as store:
        store.add_completions([record(f"a{i}", "v000001", 100.0 + i) for i in range(5)]
                              + [record(f"b{i}", "v000002", 100.5 + i) for i in range(3)]
                              + [record("base", "", 99.0)])
        assert [c.completion_id for c in store.served_completions("v000001")] == ["a4", "a3", "a2", "a1", "a0"]
        assert [c.completion_id for c in store.served_completions("v000001", after_created_at=102.0)] == ["a4", "a3"]
        assert [c.completion_id for c in store.served_completions("v000002", limit=2)] == ["b2", "b1"]
        assert [c.completion_id for c in store.served_completions("")] == ["base"]
        assert store.count_served("v000001") == 5 and store.count_served("v000001", 102.0) == 2
        assert store.count_served("v000009") == 0 and store.served_completions("v000009") == []


def test_a_version_1_store_migrates_and_keeps_its_rows(store_url: str) -> None:
    """A store written before migration 2 opens with every row kept and no token ids; new rows get them."""
    v1 = [m for m in MIGRATIONS if m.version == 1]
    with mock.patch.object(sql_module, "MIGRATIONS", v1), mock.patch.object(sql_module, "LATEST", 1):
        old: Store = open_store(store_url)
        assert old.schema_version() == 1
        with old._transaction() as cur:  # a row as the version-1 code wrote it (its 12 columns)
            old._execute(cur, "INSERT INTO completions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         ("old", 50.0, "Say hi", "[]", "hello", "v000001", "u", "{}", 3, 2, "eos", "{}"))
        old.close()
    with open_store(store_url) as store:
        assert store.schema_version() == LATEST
        kept = store.get_completion("old")
        assert (kept.text, kept.policy_version, kept.token_ids, kept.prompt_token_ids) == ("hello", "v000001", (), ())
        store.add_completions([record("new", "v000001", 60.0, prompt_token_ids=(5, 6), token_ids=(7,))])
        assert [c.completion_id for c in store.served_completions("v000001")] == ["new", "old"]
        assert store.get_completion("new").token_ids == (7,)
