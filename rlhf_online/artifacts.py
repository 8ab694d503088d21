"""Atomic, verifiable artifact directories: write under a temp name, fsync, rename; manifests with sha256."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file or directory to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file below a directory, by relative path (manifest.json excluded)."""
    return {str(p.relative_to(directory)): sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Replace a file in one step: `write(temp path)`, fsync, os.replace, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync(path.parent)


def json_safe(value: object) -> object:
    """`value` with every nan or infinity (JSON has none) replaced by None, in nested dicts and lists too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json_atomically(path: Path, data: dict) -> None:
    """Replace a JSON file in one step (see write_atomically)."""
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True)))


def publish_dir(target: Path, write: Callable[[Path], None], manifest: dict | None = None, *,
                replace: bool = True) -> Path:
    """Build a directory with `write(tmp)`, add manifest.json (file hashes + `manifest`), then rename it into place.

    Readers see either no `target` or a complete one, never a partial directory. An existing
    `target` is moved aside first and removed after (used to refresh a cached conversion), or,
    with replace=False, left alone: FileExistsError.
    """
    if not replace and target.exists():
        raise FileExistsError(f"{target} exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        write(tmp)
        if manifest is not None:
            (tmp / "manifest.json").write_text(json.dumps({**manifest, "files": file_hashes(tmp)}, indent=2))
        for p in tmp.rglob("*"):
            fsync(p)
        fsync(tmp)
        old = None
        if target.exists():
            if not replace:
                raise FileExistsError(f"{target} exists")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
        os.rename(tmp, target)  # onto a directory someone just filled: ENOTEMPTY, never a replacement
        fsync(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


class CorruptArtifact(ValueError):
    """A directory's files do not match its manifest. The message (for logs) names the files;
    `reason` says what is wrong without any path, for whoever asked over an API."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def verify_dir(directory: Path) -> dict:
    """The manifest of a directory whose files all match their recorded sha256; CorruptArtifact otherwise."""
    manifest_path = directory / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptArtifact(f"{directory}: unreadable manifest.json ({e})", "its manifest is unreadable") from None
    actual = file_hashes(directory)
    expected = manifest.get("files", {})
    if actual != expected:
        bad = sorted(set(actual.items()) ^ set(expected.items()))
        raise CorruptArtifact(f"{directory}: files do not match manifest.json ({bad[0][0]} differs)",
                              "its files do not match the checksums it was published with")
    return manifest
