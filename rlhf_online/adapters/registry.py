"""The adapter registry: v000001/ … (PEFT files + manifest.json), CURRENT naming the served version.

The versioning, atomic writes and the pointer are rlhf_online.registry's; CURRENT "" is the bare base.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rlhf_online.registry import ADAPTER_PREFIX, VersionedRegistry


class AdapterRegistry(VersionedRegistry):
    """A directory (a shared volume in Kubernetes) of published adapter versions."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, ADAPTER_PREFIX, "policy version")

    def publish(self, write: Callable[[Path], None], *, base_model: str, parent: str = "",
                metrics: dict[str, float] | None = None) -> str:
        """Write a new version with `write(dir)` (e.g. PeftModel.save_pretrained) and return its name."""
        return super().publish(write, base_model=base_model, parent=parent, metrics=metrics or {})
