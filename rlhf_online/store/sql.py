"""Every query of the store, written once; a backend adds only its connections and its Dialect.

The two databases agree on almost all of the SQL used here (`ON CONFLICT ... DO NOTHING` for the
idempotent inserts, `COUNT`, `LIMIT`, `IN`). What differs is small and lives in one place: the
placeholder style (`Dialect.placeholder`), the auto-increment key of the migrations (rendered by
`migrations.render` for `Dialect.name`), and how a transaction is opened, which each backend
implements (`_transaction`, `_reading`, `_migration_transaction`).
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

from rlhf_online.errors import ConfigError, InvalidArgument, NotFound
from rlhf_online.store.base import (
    NO_RATER,
    ROLES,
    ApiKeyRecord,
    CompletionRecord,
    FeedbackRecord,
    PreferenceRecord,
    RankingRecord,
    Rater,
    RatingEvidence,
    Store,
    VersionComparison,
    check_preference_pair,
    check_ranking,
    check_rating,
)
from rlhf_online.store.migrations import BOOKKEEPING, LATEST, MIGRATIONS, render
from rlhf_online.store.rows import (
    COMPLETION_COLUMNS,
    COMPLETION_PLACEHOLDERS,
    completion_record,
    completion_row,
    limited,
)

API_KEY_COLUMNS = "key_id, secret_sha256, tenant, role, created_at, revoked_at"
T = TypeVar("T")
# Ids per `IN (...)` query of get_completions: under SQLite's oldest bound-parameter limit (999).
IDS_PER_QUERY = 500


@dataclass(frozen=True)
class Dialect:
    """How one database spells what the two do not share."""

    name: str  # the key of migrations.SERIAL_PK: "sqlite" | "postgresql"
    placeholder: str  # "?" (sqlite3) or "%s" (psycopg)

    def sql(self, query: str) -> str:
        """A query written with `?` placeholders in this dialect's (queries here hold no literal ? or %)."""
        return query if self.placeholder == "?" else query.replace("?", self.placeholder)


SQLITE = Dialect("sqlite", "?")
POSTGRESQL = Dialect("postgresql", "%s")


class SqlStore(Store):
    """A Store over a DB-API database; subclasses supply the dialect, the connections and the transactions.

    A cursor from `_transaction()` is inside one transaction, committed durably on normal exit and
    rolled back on an exception; one from `_reading()` sees committed data.
    """

    dialect: Dialect
    where: str  # names the database in errors

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Any]:
        """A cursor inside a write transaction."""

    @abstractmethod
    def _reading(self) -> AbstractContextManager[Any]:
        """A cursor for reads."""

    def _migration_transaction(self) -> AbstractContextManager[Any]:
        """A write transaction that no other process migrates alongside (by default: `_transaction`)."""
        return self._transaction()

    def _write(self, work: Callable[[Any], T]) -> T:
        """`work(cursor)` in a write transaction; returns its result once committed (a backend may commit
        several callers' work in one transaction, each isolated from the others' errors)."""
        with self._transaction() as cur:
            return work(cur)

    def _execute(self, cur: Any, query: str, args: Sequence[Any] = ()) -> Any:
        """Run a `?`-placeholder query on a cursor, in the dialect's placeholders."""
        cur.execute(self.dialect.sql(query), args)
        return cur

    def _read(self, query: str, args: Sequence[Any] = ()) -> list[tuple]:
        """All rows of one query."""
        with self._reading() as cur:
            return self._execute(cur, query, args).fetchall()

    # ------------------------------------------------------------------ schema

    def _migrate(self) -> None:
        """Apply every migration newer than the stored version, each in its own transaction."""
        with self._migration_transaction() as cur:
            cur.execute(BOOKKEEPING)
            current = _version(cur)
        if current > LATEST:
            raise ConfigError(f"store_url: {self.where} has schema version {current}, newer than this "
                              f"code knows ({LATEST}); upgrade rlhf-online")
        for migration in MIGRATIONS:
            if migration.version <= current:
                continue
            with self._migration_transaction() as cur:
                # Another process may have applied it while this one waited for the lock.
                if _version(cur) >= migration.version:
                    continue
                for statement in migration.statements:
                    cur.execute(render(statement, self.dialect.name))
                self._execute(cur, "INSERT INTO schema_migrations (version, description, applied_at) "
                              "VALUES (?, ?, ?)", (migration.version, migration.description, time.time()))

    def schema_version(self) -> int:
        """The newest migration applied."""
        with self._reading() as cur:
            return _version(cur)

    # ------------------------------------------------------------------ writes

    def add_completions(self, records: Sequence[CompletionRecord]) -> None:
        """Insert completions in one transaction (InvalidArgument on a duplicate id)."""
        now = time.time()
        rows = [completion_row(r, now) for r in records]  # serialise before opening the transaction
        if not rows:
            return
        insert = (f"INSERT INTO completions ({COMPLETION_COLUMNS}) VALUES ({COMPLETION_PLACEHOLDERS}) "
                  "ON CONFLICT (id) DO NOTHING")
        with self._transaction() as cur:
            for row in rows:
                if self._execute(cur, insert, row).rowcount != 1:
                    raise InvalidArgument("completion_id", f"{row[0]!r} already exists")

    def add_feedback(self, completion_id: str, user_id: str, rating: str, comment: str = "",
                     rater: Rater = NO_RATER) -> bool:
        """Record a rating; False if (completion_id, user_id) already had one (the first is kept)."""
        check_rating(rating)

        def insert(cur: Any) -> bool:
            # One statement for the usual case (a new rating of a known completion); only when it
            # inserts nothing do we look at why: an unknown completion, or a repeat.
            if self._execute(cur, "INSERT INTO feedback (completion_id, user_id, rating, comment, created_at, "
                             "tenant, rater_role) SELECT ?, ?, ?, ?, ?, ?, ? "
                             "WHERE EXISTS (SELECT 1 FROM completions WHERE id = ?) "
                             "ON CONFLICT (completion_id, user_id) DO NOTHING",
                             (completion_id, user_id, rating, comment, time.time(), rater.tenant, rater.role,
                              completion_id)).rowcount == 1:
                return True
            self._require_completion(cur, completion_id)
            return False

        return self._write(insert)

    def add_preference(self, chosen_completion_id: str, rejected_completion_id: str, user_id: str,
                       rater: Rater = NO_RATER) -> bool:
        """Record a preference; False on a repeat of (chosen, rejected, user_id)."""
        check_preference_pair(chosen_completion_id, rejected_completion_id)

        def insert(cur: Any) -> bool:
            if self._execute(cur, "INSERT INTO preferences (chosen_id, rejected_id, user_id, created_at, tenant, "
                             "rater_role) SELECT ?, ?, ?, ?, ?, ? "
                             "WHERE EXISTS (SELECT 1 FROM completions WHERE id = ?) "
                             "AND EXISTS (SELECT 1 FROM completions WHERE id = ?) "
                             "ON CONFLICT (chosen_id, rejected_id, user_id) DO NOTHING",
                             (chosen_completion_id, rejected_completion_id, user_id, time.time(), rater.tenant,
                              rater.role, chosen_completion_id, rejected_completion_id)).rowcount == 1:
                return True
            self._require_completion(cur, chosen_completion_id)  # nothing inserted: which is unknown, or a repeat
            self._require_completion(cur, rejected_completion_id)
            return False

        return self._write(insert)

    def add_ranking(self, completion_ids: Sequence[str], user_id: str, rater: Rater = NO_RATER) -> bool:
        """Record a ranking (best first) of completions of one prompt; False if this user already ranked
        these completions, in any order (the first is kept).

        NotFound names the first id not in the store; InvalidArgument when they answer different prompts.
        """
        ids = check_ranking(completion_ids)
        key = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()

        def insert(cur: Any) -> bool:
            rows = self._execute(cur, f"SELECT id, prompt, messages FROM completions "
                                      f"WHERE id IN ({', '.join(['?'] * len(ids))})", ids).fetchall()
            prompts = {cid: (prompt, messages) for cid, prompt, messages in rows}
            missing = [c for c in ids if c not in prompts]
            if missing:
                raise NotFound("completion", missing[0])
            if len(set(prompts.values())) > 1:
                raise InvalidArgument("completion_ids", "a ranking compares replies to one prompt; these "
                                                        "completions answer different prompts")
            row = self._execute(cur, "INSERT INTO rankings (ranking_key, completion_ids, size, user_id, created_at, "
                                     "tenant, rater_role) VALUES (?, ?, ?, ?, ?, ?, ?) "
                                     "ON CONFLICT (ranking_key, user_id) DO NOTHING RETURNING seq",
                                (key, json.dumps(ids), len(ids), user_id, time.time(), rater.tenant,
                                 rater.role)).fetchone()
            if row is None:
                return False
            for place, cid in enumerate(ids):
                self._execute(cur, "INSERT INTO ranking_members (ranking_seq, place, completion_id) VALUES (?, ?, ?)",
                              (row[0], place, cid))
            return True

        return self._write(insert)

    def _require_completion(self, cur: Any, completion_id: str) -> None:
        """NotFound unless the completion exists (rows are never deleted, so the check cannot go stale)."""
        if self._execute(cur, "SELECT 1 FROM completions WHERE id = ?", (completion_id,)).fetchone() is None:
            raise NotFound("completion", completion_id)

    # ------------------------------------------------------------------ reads

    def get_completion(self, completion_id: str) -> CompletionRecord:
        """One completion, or NotFound."""
        rows = self._read(f"SELECT {COMPLETION_COLUMNS} FROM completions WHERE id = ?", (completion_id,))
        if not rows:
            raise NotFound("completion", completion_id)
        return completion_record(rows[0])

    def get_completions(self, completion_ids: Iterable[str]) -> dict[str, CompletionRecord]:
        """The completions with these ids, in the order first given; ids not in the store are left out."""
        wanted = list(dict.fromkeys(completion_ids))
        found: dict[str, CompletionRecord] = {}
        for k in range(0, len(wanted), IDS_PER_QUERY):
            chunk = wanted[k:k + IDS_PER_QUERY]
            rows = self._read(f"SELECT {COMPLETION_COLUMNS} FROM completions "
                              f"WHERE id IN ({', '.join(['?'] * len(chunk))})", chunk)
            found.update((row[0], completion_record(row)) for row in rows)
        return {cid: found[cid] for cid in wanted if cid in found}

    def recent_prompts(self, limit: int) -> list[str]:
        """Distinct prompts of the newest `limit` completions with a plain prompt, in code-point order."""
        query, args = limited("SELECT prompt FROM completions WHERE prompt <> '' ORDER BY created_at DESC",
                              [], limit)
        # Sorted here, not by ORDER BY: PostgreSQL would order by the database's collation, not by code point.
        return sorted({prompt for (prompt,) in self._read(query, args)})

    def list_completions(self, after_created_at: float = 0.0, limit: int | None = None) -> list[CompletionRecord]:
        """Completions created after a time, oldest first."""
        query, args = limited(f"SELECT {COMPLETION_COLUMNS} FROM completions WHERE created_at > ? "
                              "ORDER BY created_at, id", [after_created_at], limit)
        return [completion_record(row) for row in self._read(query, args)]

    def served_completions(self, policy_version: str, after_created_at: float = 0.0,
                           limit: int | None = None) -> list[CompletionRecord]:
        """Completions one policy version served after a time, newest first (the index on both columns)."""
        query, args = limited(f"SELECT {COMPLETION_COLUMNS} FROM completions WHERE policy_version = ? "
                              "AND created_at > ? ORDER BY created_at DESC, id DESC",
                              [policy_version, after_created_at], limit)
        return [completion_record(row) for row in self._read(query, args)]

    def count_served(self, policy_version: str, after_created_at: float = 0.0) -> int:
        """How many completions one policy version served after a time."""
        rows = self._read("SELECT COUNT(*) FROM completions WHERE policy_version = ? AND created_at > ?",
                          (policy_version, after_created_at))
        return int(rows[0][0])

    def list_feedback(self, after_seq: int = 0, limit: int | None = None, *, newest: bool = False,
                      seqs: Sequence[int] | None = None) -> list[FeedbackRecord]:
        """Feedback with seq > after_seq in seq order (Store.list_feedback says what `newest` and `seqs` do)."""
        rows = self._list_seq("SELECT seq, completion_id, user_id, rating, comment, created_at, tenant, rater_role "
                              "FROM feedback", after_seq, limit, newest, seqs)
        return [FeedbackRecord(*row) for row in rows]

    def list_preferences(self, after_seq: int = 0, limit: int | None = None, *, newest: bool = False,
                         seqs: Sequence[int] | None = None) -> list[PreferenceRecord]:
        """Preferences with seq > after_seq in seq order (see list_feedback)."""
        rows = self._list_seq("SELECT seq, chosen_id, rejected_id, user_id, created_at, tenant, rater_role "
                              "FROM preferences", after_seq, limit, newest, seqs)
        return [PreferenceRecord(*row) for row in rows]

    def list_rankings(self, after_seq: int = 0, limit: int | None = None, *, newest: bool = False,
                      seqs: Sequence[int] | None = None) -> list[RankingRecord]:
        """Rankings with seq > after_seq in seq order (see list_feedback)."""
        rows = self._list_seq("SELECT seq, completion_ids, user_id, created_at, tenant, rater_role FROM rankings",
                              after_seq, limit, newest, seqs)
        return [RankingRecord(seq, tuple(json.loads(ids)), *rest) for seq, ids, *rest in rows]

    def _list_seq(self, select: str, after_seq: int, limit: int | None, newest: bool,
                  seqs: Sequence[int] | None) -> list[tuple]:
        """Rows of a seq-keyed table: after a seq (the newest `limit` of them with `newest`), or these seqs."""
        if seqs is not None:
            wanted, rows = sorted(set(seqs)), []
            for k in range(0, len(wanted), IDS_PER_QUERY):
                chunk = wanted[k:k + IDS_PER_QUERY]
                rows += self._read(f"{select} WHERE seq IN ({', '.join(['?'] * len(chunk))}) ORDER BY seq", chunk)
            return rows
        query, args = limited(f"{select} WHERE seq > ? ORDER BY seq {'DESC' if newest else ''}", [after_seq], limit)
        rows = self._read(query, args)
        return rows[::-1] if newest else rows

    def compare_versions(self, a: str, b: str, after_created_at: float = 0.0,
                         same_users: bool = False) -> VersionComparison:
        """Thumbs on each version's completions created after a time, and preferences between the two.

        With `same_users`, b's thumbs count only from users who were served a completion of a in
        the window (a canary's users: the controlled comparison). Both read the window through the
        completions index on (policy_version, created_at), so the cost follows the window's traffic.
        """
        if a == b:
            raise InvalidArgument("b", f"compare two different versions, got {a!r} twice")
        # Anonymous requests ('' user) are no one's: they never make every anonymous stable rating "the same users".
        users = ("AND (c.policy_version = ? OR c.user_id IN (SELECT DISTINCT u.user_id FROM completions u "
                 "WHERE u.policy_version = ? AND u.created_at > ? AND u.user_id <> '')) ") if same_users else ""
        user_args = (a, a, after_created_at) if same_users else ()
        with self._reading() as cur:
            thumbs = self._execute(cur, "SELECT c.policy_version, f.rating, COUNT(*) FROM completions c "
                                        "JOIN feedback f ON f.completion_id = c.id "
                                        f"WHERE c.policy_version IN (?, ?) AND c.created_at > ? {users}"
                                        "GROUP BY c.policy_version, f.rating",
                                   (a, b, after_created_at, *user_args)).fetchall()
            wins = self._execute(cur, "SELECT c.policy_version, COUNT(*) FROM completions c "
                                      "JOIN preferences p ON p.chosen_id = c.id "
                                      "JOIN completions r ON r.id = p.rejected_id "
                                      "WHERE c.policy_version IN (?, ?) AND c.created_at > ? "
                                      "AND r.policy_version IN (?, ?) AND r.policy_version <> c.policy_version "
                                      "AND r.created_at > ? GROUP BY c.policy_version",
                                 (a, b, after_created_at, a, b, after_created_at)).fetchall()
        count = {(v, rating): int(n) for v, rating, n in thumbs}
        won = {v: int(n) for v, n in wins}
        (a_up, a_down), (b_up, b_down) = ((count.get((v, "thumbs_up"), 0), count.get((v, "thumbs_down"), 0))
                                          for v in (a, b))
        return VersionComparison(a_up=a_up, a_rated=a_up + a_down, b_up=b_up, b_rated=b_up + b_down,
                                 a_wins=won.get(a, 0), pairs=won.get(a, 0) + won.get(b, 0))

    # ------------------------------------------------------------------ api keys

    def add_api_key(self, key: ApiKeyRecord) -> None:
        """Store a new key (InvalidArgument if its id exists)."""
        if key.role not in ROLES:
            raise InvalidArgument("role", f"must be one of {', '.join(ROLES)}, got {key.role!r}")
        with self._transaction() as cur:
            inserted = self._execute(cur, "INSERT INTO api_keys (key_id, secret_sha256, tenant, role, created_at, "
                                          "revoked_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key_id) DO NOTHING",
                                     (key.key_id, key.secret_sha256, key.tenant, key.role, key.created_at,
                                      key.revoked_at)).rowcount
            if inserted != 1:
                raise InvalidArgument("key_id", f"{key.key_id!r} already exists")

    def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        """The key with this id, revoked or not; None if there is none."""
        rows = self._read(f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,))
        return ApiKeyRecord(*rows[0]) if rows else None

    def list_api_keys(self) -> list[ApiKeyRecord]:
        """Every key, oldest first."""
        return [ApiKeyRecord(*row) for row in self._read(f"SELECT {API_KEY_COLUMNS} FROM api_keys "
                                                          "ORDER BY created_at, key_id")]

    def revoke_api_key(self, key_id: str) -> bool:
        """Mark a key revoked from now on; False if it was already (NotFound if there is no such key)."""
        with self._transaction() as cur:
            if self._execute(cur, "SELECT 1 FROM api_keys WHERE key_id = ?", (key_id,)).fetchone() is None:
                raise NotFound("api key", key_id)
            return self._execute(cur, "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                                 (time.time(), key_id)).rowcount == 1

    def count_feedback(self, after_seq: int = 0) -> int:
        """Number of feedback rows with seq > after_seq (a range of the key: cheap however long the history)."""
        return int(self._read("SELECT COUNT(*) FROM feedback WHERE seq > ?", (after_seq,))[0][0])

    def count_preferences(self) -> int:
        """Number of preference rows."""
        return self._count("preferences")

    def count_rankings(self) -> int:
        """Number of rankings."""
        return self._count("rankings")

    def count_completions(self) -> int:
        """Number of completions."""
        return self._count("completions")

    def _count(self, table: str) -> int:
        """Rows in one of the store's own tables (never a caller's string)."""
        return int(self._read(f"SELECT COUNT(*) FROM {table}")[0][0])

    def rating_evidence(self, completion_ids: Iterable[str]) -> dict[str, RatingEvidence]:
        """The users' ratings of these completions, in the order first given; ids nobody rated are left out."""
        wanted = list(dict.fromkeys(completion_ids))
        counts: dict[str, dict[str, float]] = {}
        for k in range(0, len(wanted), IDS_PER_QUERY):
            chunk = wanted[k:k + IDS_PER_QUERY]
            with self._reading() as cur:  # the counts of a chunk from one cursor
                for kind, cid, n in self._evidence_rows(cur, chunk):
                    fields = counts.setdefault(cid, {})
                    fields[kind] = fields.get(kind, 0) + n
        return {cid: RatingEvidence(**counts[cid]) for cid in wanted if cid in counts}

    def _evidence_rows(self, cur: Any, chunk: list[str]) -> Iterable[tuple[str, str, float]]:
        """(RatingEvidence field, completion id, amount) for every rating, preference side and ranking place."""
        marks = ", ".join(["?"] * len(chunk))
        # rating is CHECKed to be thumbs_up | thumbs_down: the same names as RatingEvidence's fields.
        yield from self._execute(cur, f"SELECT rating, completion_id, COUNT(*) FROM feedback "
                                      f"WHERE completion_id IN ({marks}) GROUP BY completion_id, rating", chunk).fetchall()
        for kind, column in (("preferred", "chosen_id"), ("dispreferred", "rejected_id")):
            rows = self._execute(cur, f"SELECT {column}, COUNT(*) FROM preferences "
                                      f"WHERE {column} IN ({marks}) GROUP BY {column}", chunk).fetchall()
            yield from ((kind, cid, n) for cid, n in rows)
        places = self._execute(cur, f"SELECT m.completion_id, m.place, r.size FROM ranking_members m "
                                    f"JOIN rankings r ON r.seq = m.ranking_seq WHERE m.completion_id IN ({marks})",
                               chunk).fetchall()
        for cid, place, size in places:
            yield "ranked", cid, 1
            yield "ranked_net", cid, (size - 1 - 2 * place) / (size - 1)


def _version(cur: Any) -> int:
    """The newest applied migration, 0 for a fresh database (no placeholders: valid in every dialect)."""
    cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
    return int(cur.fetchone()[0])
