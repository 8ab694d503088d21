"""API keys: create, parse, verify; the identity a verified key gives a call.

A key reads `rlhf_<key id>_<secret>`: the id (12 hex digits) is public and finds the stored row,
the secret (64 hex digits, 256 random bits) is checked against the sha256 kept in the store. The
plaintext key is shown once, when it is created, and never stored. Keys are looked up through a
short cache (`cache_seconds`), so a revoked key stops working within that time on every replica.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass

from rlhf_online.errors import InvalidArgument, Unauthenticated
from rlhf_online.store import ROLES, ApiKeyRecord, Rater, Store

KEY_PATTERN = re.compile(r"rlhf_([0-9a-f]{12})_([0-9a-f]{64})")
METADATA_KEY = "x-api-key"  # gRPC metadata and HTTP header
MAX_TENANT_CHARS = 128


@dataclass(frozen=True)
class Identity:
    """A verified caller: the key's id, its tenant and role."""

    key_id: str
    tenant: str
    role: str  # one of ROLES

    @property
    def annotator(self) -> bool:
        """May rate any completion (labelling tools), not only those served to its own users."""
        return self.role == "annotator"

    @property
    def rater(self) -> Rater:
        """How the store records this caller's ratings."""
        return Rater(self.tenant, self.role)


def digest(secret: str) -> str:
    """The stored form of a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(store: Store, tenant: str, role: str = "user") -> tuple[ApiKeyRecord, str]:
    """A new key for `tenant` with `role`: its stored record and the plaintext key (shown once)."""
    if not tenant or len(tenant) > MAX_TENANT_CHARS or not tenant.isprintable():
        raise InvalidArgument("tenant", f"1..{MAX_TENANT_CHARS} printable characters, got {tenant!r}")
    if role not in ROLES:
        raise InvalidArgument("role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    key_id, secret = secrets.token_hex(6), secrets.token_hex(32)
    record = ApiKeyRecord(key_id=key_id, secret_sha256=digest(secret), tenant=tenant, role=role,
                          created_at=time.time())
    store.add_api_key(record)
    return record, f"rlhf_{key_id}_{secret}"


class KeyAuthenticator:
    """Verifies presented keys against the store, through a short cache of the rows it read."""

    def __init__(self, store: Store, cache_seconds: float = 5.0) -> None:
        self.store, self.cache_seconds = store, cache_seconds
        self._cache: dict[str, tuple[float, ApiKeyRecord | None]] = {}
        self._lock = threading.Lock()

    def identify(self, presented: str) -> Identity:
        """The identity of a presented key, or Unauthenticated (missing, malformed, unknown, wrong or revoked)."""
        if not presented:
            raise Unauthenticated(f"{METADATA_KEY}: an API key is required")
        match = KEY_PATTERN.fullmatch(presented.strip())
        if match is None:
            raise Unauthenticated(f"{METADATA_KEY}: not an API key of this service")
        key_id, secret = match.groups()
        record = self._lookup(key_id)
        # Compared in constant time, so the secret cannot be guessed from timings.
        if record is None or not hmac.compare_digest(record.secret_sha256, digest(secret)):
            raise Unauthenticated(f"{METADATA_KEY}: unknown or wrong API key")
        if record.revoked_at is not None:
            raise Unauthenticated(f"{METADATA_KEY}: API key {key_id} was revoked")
        return Identity(record.key_id, record.tenant, record.role)

    def _lookup(self, key_id: str) -> ApiKeyRecord | None:
        """The stored row, from the cache while it is fresh."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key_id)
        if hit is not None and now - hit[0] < self.cache_seconds:
            return hit[1]
        record = self.store.get_api_key(key_id)
        with self._lock:
            if len(self._cache) > 10_000:  # unknown ids are cached too: bound what a key scanner can fill
                self._cache.clear()
            self._cache[key_id] = (now, record)
        return record
