"""Follow a table keyed by `seq`: each poll returns the rows committed since the last one, none skipped.

Reading `seq > last_seen` is not enough on PostgreSQL: an identity value is drawn when a row is
inserted, not when its transaction commits, so a row holding seq 5 can commit after the row holding
seq 6. A reader that saw 6 and moved its mark past 5 would never see 5. So the tail remembers every
seq below its mark that it has not seen (a gap) and asks for those again on each poll, until the row
turns up or the gap is older than `gap_timeout` seconds. A gap that never fills is a value no row
will ever hold: a rolled-back insert, an `ON CONFLICT DO NOTHING` that drew a value and then wrote
nothing (every duplicate rating does), or the sequence's cache lost in a restart. The timeout only
has to outlast the longest insert transaction (milliseconds here; the default is a minute). SQLite
commits one writer at a time in seq order and never leaves a gap that fills later; the same code
serves both.

Each poll costs the new rows plus one indexed lookup of the open gaps, never the table's size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar


class HasSeq(Protocol):
    """A row with the table's monotonically drawn key."""

    @property
    def seq(self) -> int: ...


Row = TypeVar("Row", bound=HasSeq)

# The store's reads a tail needs, for one table:
#   after(seq, limit) -> rows with seq > `seq`, oldest first, at most `limit`
#   newest(limit) -> the newest `limit` rows, oldest first (where a tail starts with a window)
#   by_seq(seqs) -> the rows holding these seqs, where committed
After = Callable[[int, int | None], list[Row]]
Newest = Callable[[int], list[Row]]
BySeq = Callable[[Sequence[int]], list[Row]]


class SeqTail(Generic[Row]):
    """New rows of one table in commit-safe increments (module docstring)."""

    def __init__(self, after: After, newest: Newest, by_seq: BySeq, *, start_window: int | None = None,
                 gap_timeout: float = 60.0, page: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._after, self._newest, self._by_seq = after, newest, by_seq
        self.start_window = start_window  # the first poll reads only the newest this many rows (None: all)
        self.gap_timeout, self.page, self.clock = gap_timeout, page, clock
        self.mark = 0  # every seq <= mark was seen or is an open gap
        self.gaps: dict[int, float] = {}  # seq -> when it was first missed
        self.started = False

    def poll(self) -> list[Row]:
        """The rows that committed since the last poll (late ones among them), oldest seq first."""
        rows: list[Row] = []
        if not self.started:
            self.started = True
            if self.start_window is not None:
                rows = self._newest(self.start_window)
                if rows:  # the window's lower edge: older rows are out of it for good
                    self.mark = rows[0].seq - 1
        # The highest seq seen: the window's top, else the mark (late rows are all below it); reads are in seq order.
        high = max(self.mark, rows[-1].seq if rows else 0)
        rows += self._late()
        while True:  # page through what is new, so one poll never holds an unbounded result
            batch = self._after(high, self.page)
            rows += batch
            high = batch[-1].seq if batch else high
            if len(batch) < self.page:
                break
        self._advance(rows, high)
        return sorted(rows, key=lambda r: r.seq)

    def _late(self) -> list[Row]:
        """Rows that filled open gaps; gaps past the timeout are given up."""
        if not self.gaps:
            return []
        now = self.clock()
        for seq in [s for s, t in self.gaps.items() if now - t > self.gap_timeout]:
            del self.gaps[seq]
        found = self._by_seq(sorted(self.gaps)) if self.gaps else []
        for r in found:
            self.gaps.pop(r.seq, None)
        return found

    def _advance(self, rows: list[Row], high: int) -> None:
        """Move the mark to `high`, the highest seq seen; every unseen seq below it becomes a gap."""
        seen = {r.seq for r in rows}
        now = self.clock()
        for seq in range(self.mark + 1, high + 1):
            if seq not in seen:
                self.gaps.setdefault(seq, now)
        self.mark = high
