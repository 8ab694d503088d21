"""reward.window: the newest N of each kind of feedback, refreshed by reading only what is new."""

from __future__ import annotations

from pathlib import Path

from rlhf_online.reward.training import TrainConfig, build_dataset
from rlhf_online.reward.window import FeedbackWindow
from rlhf_online.store import CompletionRecord, Store, open_store


def completion(cid: str, prompt: str) -> CompletionRecord:
    return CompletionRecord(completion_id=cid, prompt=prompt, messages=(), text=f"reply {cid}", policy_version="")


class CountingStore:
    """A store that records which completions were fetched."""

    def __init__(self, store: Store) -> None:
        self.store, self.fetched = store, []

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)

    def get_completions(self, ids: object) -> dict:
        ids = list(ids)
        self.fetched.append(sorted(set(ids)))
        return self.store.get_completions(ids)


def test_refresh_reads_only_the_new_rows_and_their_completions(tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path / 's.db'}") as raw:
        raw.add_completions([completion(f"c{i}", f"p{i // 2}") for i in range(10)])
        for i in range(4):
            raw.add_feedback(f"c{i}", "u", "thumbs_up")
        store = CountingStore(raw)
        window = FeedbackWindow(store, size=100)  # type: ignore[arg-type]
        assert window.refresh() == 4 and store.fetched == [["c0", "c1", "c2", "c3"]]
        raw.add_feedback("c4", "u", "thumbs_down")
        raw.add_preference("c5", "c4", "v")
        raw.add_ranking(["c7", "c6"], "w")
        assert window.refresh() == 3
        assert store.fetched[-1] == ["c4", "c5", "c6", "c7"]  # each new completion once, none already held
        assert window.refresh() == 0 and store.fetched[-1] == []
        assert window.seen == 7
        assert [f.completion_id for f in window.feedback] == ["c0", "c1", "c2", "c3", "c4"]
        assert [r.completion_ids for r in window.rankings] == [("c7", "c6")]


def test_the_oldest_leave_the_window_and_their_completions_with_them(tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
        store.add_completions([completion(f"c{i}", f"p{i}") for i in range(6)])
        window = FeedbackWindow(store, size=3)
        for i in range(6):
            store.add_feedback(f"c{i}", "u", "thumbs_up")
            window.refresh()
        assert [f.completion_id for f in window.feedback] == ["c3", "c4", "c5"]
        assert set(window.completions) == {"c3", "c4", "c5"}
        store.add_preference("c0", "c5", "u")  # an old completion comes back through a new row
        window.refresh()
        assert set(window.completions) == {"c0", "c3", "c4", "c5"} and len(window.preferences) == 1
        # A fresh window starts with the newest 3 of each kind, as the one kept up to date holds.
        fresh = FeedbackWindow(store, size=3)
        fresh.refresh()
        assert fresh.feedback == window.feedback and fresh.preferences == window.preferences


def test_a_kept_window_builds_the_same_dataset_as_a_fresh_read(tmp_path: Path) -> None:
    from rlhf_online.simulate.synthetic import fill_store

    with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
        window = FeedbackWindow(store, size=TrainConfig().window_examples)
        window.refresh()  # read once before the data exists: everything after comes incrementally
        fill_store(store)
        window.refresh()
        cfg = TrainConfig()
        kept, fresh = build_dataset(store, cfg, window), build_dataset(store, cfg)
        assert kept.train.pairs == fresh.train.pairs and kept.train.singles == fresh.train.singles
        assert kept.heldout.pairs == fresh.heldout.pairs and kept.feedback_seen == fresh.feedback_seen > 0
