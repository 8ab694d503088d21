"""PostgreSQL backend, for several replicas sharing one store: a connection pool, one transaction per call."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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

MIGRATION_LOCK = 0x726C6866  # advisory-lock key: one process migrates at a time ("rlhf")


class PostgresStore(Store):
    """A Store in a PostgreSQL database; thread-safe through a pool, safe under several writer processes."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 8, connect_timeout: float = 30.0) -> None:
        from psycopg_pool import ConnectionPool

        self.url = url
        try:
            # Every call commits before it returns (autocommit off + an explicit transaction).
            self._pool = ConnectionPool(url, min_size=min_size, max_size=max_size, open=True, timeout=connect_timeout)
            self._pool.wait(timeout=connect_timeout)
        except Exception as e:
            from rlhf_online.store import redact

            self._pool.close()
            # The driver's message may quote the URL; only the redacted one goes out.
            raise ConfigError(f"store_url: cannot connect to {redact(url)} ({type(e).__name__})") from None
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """A cursor inside one transaction: committed on normal exit, rolled back on an exception."""
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            yield cur

    def _migrate(self) -> None:
        """Apply every migration newer than the stored version, under an advisory lock across processes."""
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            cur.execute(BOOKKEEPING)
            current = _version(cur)
            if current > LATEST:
                raise ConfigError(f"store_url: database has schema version {current}, newer than this code "
                                  f"knows ({LATEST}); upgrade rlhf-online")
            for migration in MIGRATIONS:
                if migration.version <= current:
                    continue
                for statement in migration.statements:
                    cur.execute(render(statement, "postgresql"))
                cur.execute("INSERT INTO schema_migrations (version, description, applied_at) VALUES (%s, %s, %s)",
                            (migration.version, migration.description, time.time()))

    # ------------------------------------------------------------------ writes

    def add_completions(self, records: Sequence[CompletionRecord]) -> None:
        """Insert completions in one transaction (InvalidArgument on a duplicate id)."""
        now = time.time()
        rows = [completion_row(r, now) for r in records]
        if not rows:
            return
        with self._tx() as cur:
            for row in rows:
                cur.execute(f"INSERT INTO completions ({COMPLETION_COLUMNS}) VALUES "
                            f"({', '.join(['%s'] * 12)}) ON CONFLICT (id) DO NOTHING", row)
                if cur.rowcount != 1:
                    raise InvalidArgument("completion_id", f"{row[0]!r} already exists")

    def add_feedback(self, completion_id: str, user_id: str, rating: str, comment: str = "") -> bool:
        """Record a rating; False if (completion_id, user_id) already had one (the first is kept)."""
        check_rating(rating)
        with self._tx() as cur:
            _require_completion(cur, completion_id)
            cur.execute("INSERT INTO feedback (completion_id, user_id, rating, comment, created_at) "
                        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (completion_id, user_id) DO NOTHING",
                        (completion_id, user_id, rating, comment, time.time()))
            return cur.rowcount == 1

    def add_preference(self, chosen_completion_id: str, rejected_completion_id: str, user_id: str) -> bool:
        """Record a preference; False on a repeat of (chosen, rejected, user_id)."""
        check_preference_pair(chosen_completion_id, rejected_completion_id)
        with self._tx() as cur:
            _require_completion(cur, chosen_completion_id)
            _require_completion(cur, rejected_completion_id)
            cur.execute("INSERT INTO preferences (chosen_id, rejected_id, user_id, created_at) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT (chosen_id, rejected_id, user_id) DO NOTHING",
                        (chosen_completion_id, rejected_completion_id, user_id, time.time()))
            return cur.rowcount == 1

    # ------------------------------------------------------------------ reads

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._tx() as cur:
            cur.execute(sql, args)
            return cur.fetchall()

    def get_completion(self, completion_id: str) -> CompletionRecord:
        """One completion, or NotFound."""
        rows = self._read(f"SELECT {COMPLETION_COLUMNS} FROM completions WHERE id = %s", (completion_id,))
        if not rows:
            raise NotFound("completion", completion_id)
        return completion_record(rows[0])

    def list_completions(self, after_created_at: float = 0.0, limit: int | None = None) -> list[CompletionRecord]:
        """Completions created after a time, oldest first."""
        sql, args = limited(f"SELECT {COMPLETION_COLUMNS} FROM completions WHERE created_at > %s "
                            "ORDER BY created_at, id", [after_created_at], limit, "%s")
        return [completion_record(row) for row in self._read(sql, args)]

    def list_feedback(self, after_seq: int = 0, limit: int | None = None) -> list[FeedbackRecord]:
        """Feedback with seq > after_seq, in seq order."""
        sql, args = limited("SELECT seq, completion_id, user_id, rating, comment, created_at FROM feedback "
                            "WHERE seq > %s ORDER BY seq", [after_seq], limit, "%s")
        return [FeedbackRecord(*row) for row in self._read(sql, args)]

    def list_preferences(self, after_seq: int = 0, limit: int | None = None) -> list[PreferenceRecord]:
        """Preferences with seq > after_seq, in seq order."""
        sql, args = limited("SELECT seq, chosen_id, rejected_id, user_id, created_at FROM preferences "
                            "WHERE seq > %s ORDER BY seq", [after_seq], limit, "%s")
        return [PreferenceRecord(*row) for row in self._read(sql, args)]

    def count_feedback(self) -> int:
        """Number of feedback rows."""
        return int(self._read("SELECT COUNT(*) FROM feedback")[0][0])

    def count_preferences(self) -> int:
        """Number of preference rows."""
        return int(self._read("SELECT COUNT(*) FROM preferences")[0][0])

    def count_completions(self) -> int:
        """Number of completions."""
        return int(self._read("SELECT COUNT(*) FROM completions")[0][0])

    def schema_version(self) -> int:
        """The newest migration applied."""
        with self._tx() as cur:
            return _version(cur)

    def close(self) -> None:
        """Close the pool; calling it again does nothing."""
        self._pool.close()


def _version(cur: Any) -> int:
    cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
    return int(cur.fetchone()[0])


def _require_completion(cur: Any, completion_id: str) -> None:
    """NotFound unless the completion exists (rows are never deleted, so the check cannot go stale)."""
    cur.execute("SELECT 1 FROM completions WHERE id = %s", (completion_id,))
    if cur.fetchone() is None:
        raise NotFound("completion", completion_id)
