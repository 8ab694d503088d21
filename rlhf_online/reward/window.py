"""The reward model's training data, kept up to date incrementally: the newest N of each kind of feedback.

A retraining used to read every rating ever stored, and every completion they point at, so its
store time grew with the history. The window instead follows the three feedback tables with a
commit-safe tail (store.tail: a row that commits after a later one is still read), keeps the newest
`window_examples` thumbs, preferences and rankings (by seq; older ones leave the window as new ones
arrive), and the completions they refer to, fetched once when a row first refers to them and
dropped when no row in the window does. A refresh reads what is new since the last; its cost is
that of the new rows, however long the history. Encoding the texts is cached separately, by the
encoder (reward.encoder's LRU).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterator
from typing import Any

from rlhf_online.store import CompletionRecord, FeedbackRecord, PreferenceRecord, RankingRecord, Store
from rlhf_online.store.tail import SeqTail

KINDS = ("feedback", "preferences", "rankings")


def _ids(row: Any) -> Iterator[str]:
    """The completions one feedback row refers to."""
    if isinstance(row, FeedbackRecord):
        yield row.completion_id
    elif isinstance(row, PreferenceRecord):
        yield from (row.chosen_completion_id, row.rejected_completion_id)
    else:
        yield from row.completion_ids


class FeedbackWindow:
    """The newest `size` rows of each feedback table and the completions they rate, refreshed incrementally."""

    def __init__(self, store: Store, size: int, gap_timeout: float = 60.0) -> None:
        self.store, self.size = store, size
        readers = {"feedback": store.list_feedback, "preferences": store.list_preferences,
                   "rankings": store.list_rankings}
        self._tails = {kind: SeqTail(read, lambda limit, r=read: r(limit=limit, newest=True),
                                     lambda seqs, r=read: r(seqs=seqs), start_window=size, gap_timeout=gap_timeout)
                       for kind, read in readers.items()}
        self._rows: dict[str, dict[int, Any]] = {kind: {} for kind in KINDS}  # kind -> seq -> row
        self._seqs: dict[str, list[int]] = {kind: [] for kind in KINDS}  # a heap of each kind's seqs: oldest first out
        self._refs: Counter[str] = Counter()  # completion id -> rows in the window that refer to it
        self.completions: dict[str, CompletionRecord] = {}
        self.seen = 0  # rows read since the window was made: what retraining is due on

    def refresh(self) -> int:
        """Read what committed since the last refresh; returns how many rows that was."""
        new_ids: list[str] = []
        unreferenced: list[str] = []  # completions the rows that left the window referred to last
        added = 0
        for kind in KINDS:
            rows = self._rows[kind]
            for row in self._tails[kind].poll():
                if row.seq in rows:
                    continue
                rows[row.seq] = row
                heapq.heappush(self._seqs[kind], row.seq)
                added += 1
                for cid in _ids(row):
                    self._refs[cid] += 1
                    if cid not in self.completions:
                        new_ids.append(cid)
            while len(rows) > self.size:  # the oldest leave (a late row may be among them)
                for cid in _ids(rows.pop(heapq.heappop(self._seqs[kind]))):
                    self._refs[cid] -= 1
                    if self._refs[cid] <= 0:
                        unreferenced.append(cid)
        # Feedback references existing completions (a foreign key): every id is found.
        self.completions.update(self.store.get_completions(new_ids))
        for cid in unreferenced:
            if self._refs[cid] <= 0:  # not referred to again by a new row meanwhile
                del self._refs[cid]
                self.completions.pop(cid, None)
        self.seen += added
        return added

    @property
    def feedback(self) -> list[FeedbackRecord]:
        """Thumbs in the window, oldest first."""
        return [self._rows["feedback"][s] for s in sorted(self._rows["feedback"])]

    @property
    def preferences(self) -> list[PreferenceRecord]:
        """Preferences in the window, oldest first."""
        return [self._rows["preferences"][s] for s in sorted(self._rows["preferences"])]

    @property
    def rankings(self) -> list[RankingRecord]:
        """Rankings in the window, oldest first."""
        return [self._rows["rankings"][s] for s in sorted(self._rows["rankings"])]
