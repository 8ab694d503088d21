"""PostgreSQL backend, for several replicas sharing one store: a connection pool, one transaction per call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rlhf_online.errors import ConfigError, Unavailable
from rlhf_online.store.sql import POSTGRESQL, SqlStore

MIGRATION_LOCK = 0x726C6866  # advisory-lock key: one process migrates at a time ("rlhf")


class PostgresStore(SqlStore):
    """A Store in a PostgreSQL database; thread-safe through a pool, safe under several writer processes."""

    dialect = POSTGRESQL
    where = "database"

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 8, connect_timeout: float = 30.0) -> None:
        from psycopg_pool import ConnectionPool

        self.url = url
        try:
            # Every call commits before it returns (autocommit off + an explicit transaction).
            # `check`: a connection is tested as it leaves the pool, so one that a database restart (or a
            # dropped link) killed is replaced instead of failing the request that drew it.
            self._pool = ConnectionPool(url, min_size=min_size, max_size=max_size, open=True, timeout=connect_timeout,
                                        check=ConnectionPool.check_connection)
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
    def _transaction(self) -> Iterator[Any]:
        """A cursor inside one transaction: committed on normal exit, rolled back on an exception.

        The database out of reach (restarting, no connection within connect_timeout) is Unavailable: the
        caller may retry, and nothing of the failed call was committed.
        """
        import psycopg
        from psycopg_pool import PoolClosed

        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur
        except PoolClosed:
            raise Unavailable("the store is closed") from None
        except psycopg.OperationalError as e:
            raise Unavailable(f"the store's database is unreachable ({type(e).__name__}); retry") from e

    _reading = _transaction  # a read-only transaction per call: each sees one consistent snapshot

    @contextmanager
    def _migration_transaction(self) -> Iterator[Any]:
        """A transaction holding an advisory lock, so that concurrent processes migrate one at a time."""
        with self._transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            yield cur

    def close(self) -> None:
        """Close the pool; calling it again does nothing."""
        self._pool.close()
