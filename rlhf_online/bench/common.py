"""What every benchmark shares: the machine line and writing JSON + Markdown (services start via rlhf_online.launch)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine() -> str:
    """A one-line description of this machine."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"


def write_report(out: str | Path, name: str, result: dict, lines: list[str]) -> None:
    """<out>/<name>.json and <name>.md, and the table on stdout."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
