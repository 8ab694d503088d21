"""The adapter registry: v000001/ … (PEFT files + manifest.json), CURRENT naming the served version.

Versions are written under a temp name, fsynced and renamed, so a reader never sees a partial one;
CURRENT is replaced with os.replace, so it always names a complete version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rlhf_online.artifacts import fsync, publish_dir, verify_dir
from rlhf_online.errors import InvalidArgument, NotFound

VERSION_RE = re.compile(r"^v[0-9]{6}\Z")  # \Z, not $: "v000001\n" is no version


class AdapterRegistry:
    """A directory (a shared volume in Kubernetes) of published adapter versions."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def versions(self) -> list[str]:
        """Every complete published version, oldest first."""
        return sorted(p.name for p in self.root.iterdir()
                      if VERSION_RE.match(p.name) and (p / "manifest.json").is_file())

    def path(self, version: str) -> Path:
        """Where a version lives (NotFound if it does not exist)."""
        if not VERSION_RE.match(version):
            raise InvalidArgument("version", f"must look like v000001, got {version!r}")
        if not (self.root / version / "manifest.json").is_file():
            raise NotFound("policy version", version)
        return self.root / version

    def manifest(self, version: str) -> dict:
        """A version's manifest, after checking every file against its sha256 (ValueError if corrupt)."""
        return verify_dir(self.path(version))

    def current(self) -> str:
        """The version CURRENT names, or "" (the bare base) when none was activated."""
        try:
            return (self.root / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return ""

    def publish(self, write: Callable[[Path], None], *, base_model: str, parent: str = "",
                metrics: dict[str, float] | None = None) -> str:
        """Write a new version with `write(dir)` (e.g. PeftModel.save_pretrained) and return its name."""
        existing = [int(v[1:]) for v in self.versions()]
        version = f"v{max(existing, default=0) + 1:06d}"
        publish_dir(self.root / version, write, manifest={
            "version": version, "base_model": base_model, "parent": parent, "metrics": metrics or {},
            "created_at": time.time()})
        return version

    def activate(self, version: str) -> None:
        """Make `version` (or "" for the bare base) what replicas serve: verify it, then replace CURRENT."""
        if version:
            try:
                self.manifest(version)
            except ValueError as e:
                raise InvalidArgument("version", f"{version} is corrupt: {e}") from None
        with tempfile.NamedTemporaryFile("w", dir=self.root, prefix=".CURRENT.", delete=False) as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, self.root / "CURRENT")
        fsync(self.root)

    def rollback(self) -> str:
        """Activate the newest version older than the current one ("" when none is older); return it."""
        current = self.current()
        older = [v for v in self.versions() if not current or v < current]
        target = older[-1] if older else ""
        self.activate(target)
        return target

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest `keep` versions (never the current one); return what was removed."""
        current = self.current()
        doomed = [v for v in self.versions()[:-keep] if v != current] if keep > 0 else []
        for v in doomed:
            # Rename first so the version disappears atomically, then delete at leisure.
            trash = self.root / f".{v}.deleted-{os.getpid()}"
            os.rename(self.root / v, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return doomed

    def describe(self) -> list[dict]:
        """Manifests of all versions (unverified: for listing), oldest first."""
        return [json.loads((self.root / v / "manifest.json").read_text()) for v in self.versions()]
