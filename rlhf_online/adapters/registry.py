"""The adapter registry: v000001/ … (PEFT files + manifest.json), CURRENT and CANARY naming the served versions.

The versioning, atomic writes and CURRENT are rlhf_online.registry's; CURRENT "" is the bare base.
CANARY names a version that a share of users is served instead (sticky per user) until their
feedback promotes it to CURRENT or rolls it back; it is written atomically like CURRENT, and ""
(or no file) means no canary. Each canary's record — when it went live, the evidence and the
decision — is decisions/<version>.json, rewritten atomically as it changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_online.artifacts import write_json_atomically
from rlhf_online.errors import InvalidArgument, NotFound
from rlhf_online.registry import ADAPTER_PREFIX, POINTER, VersionedRegistry, is_version

CANARY = "CANARY"
DECISIONS = "decisions"
# A candidate's record goes queued -> live (served as the canary) -> promoted | rolled_back; a queued
# one may instead be superseded (a newer candidate went live in its place) or discarded (its parent
# was rolled back).
QUEUED, LIVE, PROMOTED, ROLLED_BACK, SUPERSEDED, DISCARDED = (
    "queued", "live", "promoted", "rolled_back", "superseded", "discarded")


class AdapterRegistry(VersionedRegistry):
    """A directory (a shared volume in Kubernetes) of published adapter versions."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, ADAPTER_PREFIX, "policy version")

    def publish(self, write: Callable[[Path], None], *, base_model: str, parent: str = "",
                metrics: dict[str, float] | None = None) -> str:
        """Write a new version with `write(dir)` (e.g. PeftModel.save_pretrained) and return its name."""
        return super().publish(write, base_model=base_model, parent=parent, metrics=metrics or {})

    def pointers_stamp(self) -> tuple[tuple[int, int, int] | None, ...]:
        """(inode, mtime ns, size) of CURRENT and CANARY, None where absent: a stat apiece, no read.

        Pointers are replaced by rename, so a new write is a new inode even within one mtime tick.
        """
        stamps = []
        for name in (POINTER, CANARY):
            try:
                st = (self.root / name).stat()
                stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                stamps.append(None)
        return tuple(stamps)

    # ------------------------------------------------------------ the canary pointer

    def canary(self) -> str:
        """The version CANARY names, or "" when there is no canary."""
        return self.read_pointer(CANARY)

    def in_use(self) -> set[str]:
        """Never pruned: CURRENT, CANARY, queued candidates and the versions between them and CURRENT."""
        current, canary = self.current(), self.canary()
        kept = {current, canary}
        for version in [canary, *self.with_outcome(QUEUED)]:
            if version:
                kept.update(self.lineage(version, current) or [version])
        return kept

    def set_canary(self, version: str) -> None:
        """Make `version` the canary ("" = none): verified first, and never the version CURRENT names."""
        if version and version == self.current():
            raise InvalidArgument("version", f"{version} is already CURRENT; a canary must be another version")
        self.write_pointer(CANARY, version)

    def promote(self) -> str:
        """CURRENT := CANARY, then no canary; returns the promoted version (InvalidArgument without a canary).

        CURRENT moves first: a replica reading between the two writes sees the same version as
        stable and canary, which serves everyone that version — never a version nobody promoted.
        """
        canary = self.canary()
        if not canary:
            raise InvalidArgument("canary", "there is no canary to promote")
        self.activate(canary)
        self.set_canary("")
        return canary

    def rollback(self) -> str:
        """Drop the canary if there is one, else activate the version before CURRENT; returns what is stable now.

        The version before CURRENT is the stable one it was promoted over when a canary record says
        so (never a candidate users rejected), else the newest version older than CURRENT.
        """
        if self.canary():
            self.set_canary("")
            return self.current()
        record = self.decision(self.current()) if self.current() else None
        if record and record.get("outcome") == PROMOTED and "stable" in record:
            self.activate(record["stable"])
            return record["stable"]
        return super().rollback()

    # ------------------------------------------------------------ canary records

    def record(self, version: str, fields: dict[str, Any]) -> dict:
        """Merge `fields` into a version's canary record (created on first use) and return it.

        A record is created only for a version that exists; it outlives the version (a pruned
        candidate's record still says what became of it).
        """
        old = self.decision(version) if is_version(version, self.prefix) else None
        if old is None:
            self.path(version)  # InvalidArgument if malformed, NotFound if never published
            old = {"version": version}
        new = {**old, **fields}
        write_json_atomically(self.root / DECISIONS / f"{version}.json", new)
        return new

    def decision(self, version: str) -> dict | None:
        """A version's canary record, or None if it never was a canary candidate."""
        try:
            return json.loads((self.root / DECISIONS / f"{version}.json").read_text())
        except FileNotFoundError:
            return None

    def decisions(self) -> list[dict]:
        """Every canary record, oldest version first."""
        folder = self.root / DECISIONS
        return [json.loads(p.read_text()) for p in sorted(folder.glob(f"{self.prefix}*.json"))] if folder.is_dir() else []

    # ------------------------------------------------------------ lineage

    def parent(self, version: str) -> str:
        """The version a version was trained from ("" = the bare base), from its manifest."""
        return self.info(version).get("parent", "")

    def lineage(self, version: str, ancestor: str) -> list[str] | None:
        """The versions from `ancestor` (excluded) down to `version` (included), oldest first; None if not a descendant."""
        chain: list[str] = []
        while version != ancestor:
            if not version or version in chain:
                return None  # reached the bare base (or a loop) without meeting the ancestor
            chain.append(version)
            try:
                version = self.parent(version)
            except (NotFound, FileNotFoundError):
                return None  # a pruned parent ends the chain
        return chain[::-1]

    def with_outcome(self, outcome: str, records: list[dict] | None = None) -> list[str]:
        """Versions whose record has this outcome, oldest first (among `records`, read once by the caller, if given)."""
        return [r["version"] for r in (self.decisions() if records is None else records) if r.get("outcome") == outcome]
