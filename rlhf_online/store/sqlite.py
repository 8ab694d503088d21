"""The embedded SQLite backend: one WAL connection shared by every thread under a lock."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf_online.errors import ConfigError, InvalidArgument, NotFound
from rlhf_online.store.base import (
    CompletionRecord,
    FeedbackRecord,
    PreferenceRecord,
    Store,
    check_preference_pair,
    check_rating,
)
from rlhf_online.store.migrations import BOOKKEEPING, LATEST, MIGRATIONS, render
from rlhf_online.store.rows import COMPLETION_COLUMNS, completion_record, completion_row, limited


class SqliteStore(Store):
    """A Store in one SQLite file (or `:memory:`); safe to call from many threads at once."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 10.0) -> None:
        self.path = str(path)
        memory = self.path == ":memory:"
        if not memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # One connection: SQLite allows a single writer anyway, and the lock makes every call atomic.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                     check_same_thread=False)
        try:
            self._configure(memory, busy_timeout_s)
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    # ------------------------------------------------------------------ setup

    def _configure(self, memory: bool, busy_timeout_s: float) -> None:
        """WAL so readers never block the writer; FULL so a returned commit survives power loss."""
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if not memory and str(mode).lower() != "wal":
            raise ConfigError(f"store_url: cannot enable WAL journal mode on {self.path!r} (got {mode!r})")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # Other processes (a second replica, the CLI) may hold the write lock for a moment.
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")

    def _migrate(self) -> None:
        """Apply every migration newer than the stored version, each in its own transaction."""
        with self._write() as c:
            c.execute(BOOKKEEPING)
        current = self.schema_version()
        if current > LATEST:
            raise ConfigError(f"store_url: {self.path!r} has schema version {current}, newer than this "
                              f"code knows ({LATEST}); upgrade rlhf-online")
        for migration in MIGRATIONS:
            if migration.version <= current:
                continue
            with self._write() as c:
                # Another process may have applied it while this one waited for the write lock.
                if _version(c) >= migration.version:
                    continue
                for statement in migration.statements:
                    c.execute(render(statement, "sqlite"))
                c.execute("INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                          (migration.version, migration.description, time.time()))

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed (durably) on normal exit, rolled back on an exception."""
        with self._lock:
            # IMMEDIATE takes the write lock up front, so a read-then-write never fails half way.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT: the shared connection must never be left mid-transaction.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        """All rows of one query."""
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------ writes

    def add_completions(self, records: Sequence[CompletionRecord]) -> None:
        """Insert completions in one transaction (InvalidArgument on a duplicate id)."""
        now = time.time()
        rows = [completion_row(r, now) for r in records]  # serialise before taking the lock
        if not rows:
            return
        with self._write() as c:
            for row in rows:
                cur = c.execute(f"INSERT INTO completions ({COMPLETION_COLUMNS}) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING", row)
                if cur.rowcount != 1:
                    raise InvalidArgument("completion_id", f"{row[0]!r} already exists")

    def add_feedback(self, completion_id: str, user_id: str, rating: str, comment: str = "") -> bool:
        """Record a rating; False if (completion_id, user_id) already had one (the first is kept)."""
        check_rating(rating)
        with self._write() as c:
            _require_completion(c, completion_id)
            cur = c.execute("INSERT INTO feedback (completion_id, user_id, rating, comment, created_at) "
                            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (completion_id, user_id) DO NOTHING",
                            (completion_id, user_id, rating, comment, time.time()))
            return cur.rowcount == 1

    def add_preference(self, chosen_completion_id: str, rejected_completion_id: str, user_id: str) -> bool:
        """Record a preference; False on a repeat of (chosen, rejected, user_id)."""
        check_preference_pair(chosen_completion_id, rejected_completion_id)
        with self._write() as c:
            _require_completion(c, chosen_completion_id)
            _require_completion(c, rejected_completion_id)
            cur = c.execute("INSERT INTO preferences (chosen_id, rejected_id, user_id, created_at) "
                            "VALUES (?, ?, ?, ?) ON CONFLICT (chosen_id, rejected_id, user_id) DO NOTHING",
                            (chosen_completion_id, rejected_completion_id, user_id, time.time()))
            return cur.rowcount == 1

    # ------------------------------------------------------------------ reads

    def get_completion(self, completion_id: str) -> CompletionRecord:
        """One completion, or NotFound."""
        rows = self._read(f"SELECT {COMPLETION_COLUMNS} FROM completions WHERE id = ?", (completion_id,))
        if not rows:
            raise NotFound("completion", completion_id)
        return completion_record(rows[0])

    def list_completions(self, after_created_at: float = 0.0, limit: int | None = None) -> list[CompletionRecord]:
        """Completions created after a time, oldest first."""
        sql, args = limited(f"SELECT {COMPLETION_COLUMNS} FROM completions WHERE created_at > ? "
                             "ORDER BY created_at, id", [after_created_at], limit)
        return [completion_record(row) for row in self._read(sql, args)]

    def list_feedback(self, after_seq: int = 0, limit: int | None = None) -> list[FeedbackRecord]:
        """Feedback with seq > after_seq, in seq order."""
        sql, args = limited("SELECT seq, completion_id, user_id, rating, comment, created_at FROM feedback "
                             "WHERE seq > ? ORDER BY seq", [after_seq], limit)
        return [FeedbackRecord(*row) for row in self._read(sql, args)]

    def list_preferences(self, after_seq: int = 0, limit: int | None = None) -> list[PreferenceRecord]:
        """Preferences with seq > after_seq, in seq order."""
        sql, args = limited("SELECT seq, chosen_id, rejected_id, user_id, created_at FROM preferences "
                             "WHERE seq > ? ORDER BY seq", [after_seq], limit)
        return [PreferenceRecord(*row) for row in self._read(sql, args)]

    def count_feedback(self) -> int:
        """Number of feedback rows."""
        return self._read("SELECT COUNT(*) FROM feedback")[0][0]

    def count_preferences(self) -> int:
        """Number of preference rows."""
        return int(self._read("SELECT COUNT(*) FROM preferences")[0][0])

    def count_completions(self) -> int:
        """Number of completions."""
        return self._read("SELECT COUNT(*) FROM completions")[0][0]

    def schema_version(self) -> int:
        """The newest migration applied."""
        with self._lock:
            return _version(self._db)

    def close(self) -> None:
        """Close the connection; calling it again does nothing."""
        with self._lock:
            self._db.close()


def _version(conn: sqlite3.Connection) -> int:
    """The newest applied migration, 0 for a fresh database."""
    return conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]


def _require_completion(conn: sqlite3.Connection, completion_id: str) -> None:
    """NotFound unless the completion exists (rows are never deleted, so the check cannot go stale)."""
    if conn.execute("SELECT 1 FROM completions WHERE id = ?", (completion_id,)).fetchone() is None:
        raise NotFound("completion", completion_id)
