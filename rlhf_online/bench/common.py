"""What every benchmark shares: the machine line and writing JSON + Markdown (services start via rlhf_online.launch)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


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


def wait_until_served(stub: Any, version: str, timeout: float, where: str = "") -> None:
    """Poll the generation service's GetPolicy until it serves `version`; RuntimeError after `timeout` s."""
    from rlhf_online.v1 import generation_pb2 as pb

    deadline = time.monotonic() + timeout
    while stub.GetPolicy(pb.GetPolicyRequest(), timeout=30).version != version:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the generation service did not switch to {version!r} within {timeout:.0f} s{where}")
        time.sleep(0.2)
