"""Completions, feedback, preferences and rankings behind one interface; the backend is chosen by URL."""

from __future__ import annotations

import re

from rlhf_online.errors import ConfigError
from rlhf_online.store.base import (
    NO_RATER,
    RATINGS,
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
)

__all__ = ["NO_RATER", "RATINGS", "ROLES", "ApiKeyRecord", "CompletionRecord", "FeedbackRecord", "PreferenceRecord", "RankingRecord", "RatingEvidence", "Rater", "Store", "VersionComparison",
           "open_store"]

SQLITE_PREFIX = "sqlite:///"


def open_store(url: str) -> Store:
    """`sqlite:///rel.db` (relative), `sqlite:////abs.db` (absolute), `sqlite:///:memory:`, `postgresql://…`."""
    if url.startswith(SQLITE_PREFIX):
        from rlhf_online.store.sqlite import SqliteStore

        path = url[len(SQLITE_PREFIX):]
        if not path:
            raise ConfigError(f"store_url: no database path in {url!r} (want sqlite:///path.db)")
        return SqliteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        from rlhf_online.store.postgres import PostgresStore

        return PostgresStore(url)
    raise ConfigError(f"store_url: unsupported {redact(url)!r} (want sqlite:///path.db or postgresql://...)")


def redact(url: str) -> str:
    """The URL with any password masked, so it can go into errors and logs."""
    return re.sub(r"^([a-zA-Z][\w+.-]*://[^:/@]*):[^@/]*@", r"\1:***@", url)
