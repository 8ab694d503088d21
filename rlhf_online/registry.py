"""Versioned artifact directories: <prefix>000001/ … each with manifest.json, and CURRENT naming the served one.

Used by the adapter registry (v000001/ …) and the reward-model registry (r000001/ …). A version is
built under a temp name, fsynced and renamed into place, never over an existing one, so a reader
sees either no version or a complete one; CURRENT (the version's name and a newline) is replaced
with os.replace, so it always names a complete version. Reward registries written before CURRENT
was shared kept their pointer in CURRENT.json; it is still read when CURRENT is missing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_online.artifacts import CorruptArtifact, publish_dir, verify_dir, write_atomically
from rlhf_online.errors import InvalidArgument, NotFound

log = logging.getLogger("rlhf_online.registry")

ADAPTER_PREFIX = "v"  # v000001: policy (LoRA adapter) versions
REWARD_PREFIX = "r"  # r000001: learned reward model versions
POINTER = "CURRENT"
LEGACY_POINTER = "CURRENT.json"  # {"version": ...}: reward registries before the shared pointer

_DIGITS = re.compile(r"[0-9]{6}")  # [0-9], not \d: "٠٠٠٠٠١" is no version; fullmatch: "v000001\n" is none either


def is_version(name: str, prefix: str) -> bool:
    """Whether `name` is a well-formed version of the registry with this prefix (e.g. v000001)."""
    return name.startswith(prefix) and _DIGITS.fullmatch(name, len(prefix)) is not None


_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


def _publish_lock(root: Path) -> threading.Lock:
    """One lock per registry directory in this process, shared by every registry object opened on it."""
    with _locks_guard:
        return _locks.setdefault(root.resolve(), threading.Lock())


class VersionedRegistry:
    """A directory of numbered, verified artifact versions and the pointer to the served one."""

    def __init__(self, root: Path, prefix: str, kind: str) -> None:
        self.root, self.prefix, self.kind = Path(root), prefix, kind  # kind names a version in NotFound
        self.root.mkdir(parents=True, exist_ok=True)

    def versions(self) -> list[str]:
        """Every complete published version, oldest first."""
        return sorted(p.name for p in self.root.iterdir()
                      if is_version(p.name, self.prefix) and (p / "manifest.json").is_file())

    def next_version(self) -> str:
        """The name the next publish takes: one above every version name present, complete or not."""
        taken = [int(p.name[len(self.prefix):]) for p in self.root.iterdir() if is_version(p.name, self.prefix)]
        return f"{self.prefix}{max(taken, default=0) + 1:06d}"

    def path(self, version: str) -> Path:
        """Where a version lives (InvalidArgument if malformed, NotFound if it does not exist)."""
        if not is_version(version, self.prefix):
            raise InvalidArgument("version", f"must look like {self.prefix}000001, got {version!r}")
        if not (self.root / version / "manifest.json").is_file():
            raise NotFound(self.kind, version)
        return self.root / version

    def manifest(self, version: str) -> dict:
        """A version's manifest, after checking every file against its sha256 (CorruptArtifact if corrupt)."""
        return verify_dir(self.path(version))

    def info(self, version: str) -> dict:
        """A version's manifest, unverified (to read its fields; `manifest` checks the files too)."""
        return json.loads((self.path(version) / "manifest.json").read_text())

    def describe(self) -> list[dict]:
        """Manifests of all versions (unverified: for listing), oldest first."""
        return [self.info(v) for v in self.versions()]

    def publish(self, write: Callable[[Path], None], **fields: Any) -> str:
        """Write a new version with `write(dir)` and `fields` in its manifest; return its name.

        Numbering and writing hold the registry's lock, so two publishers in one process never
        pick the same name; across processes the final rename refuses an existing version.
        """
        with _publish_lock(self.root):
            version = self.next_version()
            publish_dir(self.root / version, write, replace=False,
                        manifest={"version": version, **fields, "created_at": time.time()})
        return version

    def read_pointer(self, name: str) -> str:
        """The version a pointer file (CURRENT, CANARY) names, or "" when it is absent or empty."""
        try:
            return (self.root / name).read_text().strip()
        except FileNotFoundError:
            return ""

    def write_pointer(self, name: str, version: str) -> None:
        """Point `name` at `version` ("" = none): verify the version's files, then replace the file in one step."""
        if version:
            try:
                self.manifest(version)
            except CorruptArtifact as e:
                # The caller learns which version and what is wrong; the files and where they are, only the log.
                log.error("refused a corrupt version", extra={"version": version, "pointer": name, "error": str(e)})
                raise InvalidArgument("version", f"{version} is corrupt: {e.reason}") from None
        write_atomically(self.root / name, lambda tmp: tmp.write_text(version + "\n"))

    def current(self) -> str:
        """The version CURRENT names, or "" when none was activated."""
        if (self.root / POINTER).exists():
            return self.read_pointer(POINTER)
        try:
            return json.loads((self.root / LEGACY_POINTER).read_text())["version"]
        except FileNotFoundError:
            return ""

    def activate(self, version: str) -> None:
        """Make `version` ("" = none) the served one: verify it, then replace CURRENT."""
        self.write_pointer(POINTER, version)
        # CURRENT wins from now on; the old pointer would only mislead a reader of the directory.
        (self.root / LEGACY_POINTER).unlink(missing_ok=True)

    def rollback(self) -> str:
        """Activate the newest version older than the current one ("" when none is older); return it."""
        current = self.current()
        older = [v for v in self.versions() if not current or v < current]
        target = older[-1] if older else ""
        self.activate(target)
        return target

    def in_use(self) -> set[str]:
        """Versions a pointer names (never pruned)."""
        return {self.current()}

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest `keep` versions (never one a pointer names); return what was removed."""
        pinned = self.in_use()
        doomed = [v for v in self.versions()[:-keep] if v not in pinned] if keep > 0 else []
        for v in doomed:
            # Rename first so the version disappears atomically, then delete at leisure.
            trash = self.root / f".{v}.deleted-{os.getpid()}"
            os.rename(self.root / v, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return doomed
