"""The embedded SQLite backend: one WAL connection shared by every thread under a lock."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rlhf_online.errors import ConfigError
from rlhf_online.store.sql import SQLITE, SqlStore


class SqliteStore(SqlStore):
    """A Store in one SQLite file (or `:memory:`); safe to call from many threads at once."""

    dialect = SQLITE

    def __init__(self, path: str | Path, busy_timeout_s: float = 10.0) -> None:
        self.path = str(path)
        self.where = repr(self.path)
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

    def _configure(self, memory: bool, busy_timeout_s: float) -> None:
        """WAL so readers never block the writer; FULL so a returned commit survives power loss."""
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if not memory and str(mode).lower() != "wal":
            raise ConfigError(f"store_url: cannot enable WAL journal mode on {self.path!r} (got {mode!r})")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # Other processes (a second replica, the CLI) may hold the write lock for a moment.
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        """A write transaction: committed (durably) on normal exit, rolled back on an exception."""
        with self._lock:
            cur = self._db.cursor()
            # IMMEDIATE takes the write lock up front (also across processes), so a read-then-write
            # never fails half way and two processes never migrate at once.
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT: the shared connection must never be left mid-transaction.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            finally:
                cur.close()

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Cursor]:
        """A cursor on the shared connection (autocommit: each query sees the latest commit)."""
        with self._lock:
            cur = self._db.cursor()
            try:
                yield cur
            finally:
                cur.close()

    def close(self) -> None:
        """Close the connection; calling it again does nothing."""
        with self._lock:
            self._db.close()
