"""The project's own demo prompts: everyday requests that invite replies of every tone, in train and held-out splits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CATEGORIES: tuple[str, ...] = ("complaint", "review", "rude_reply", "opinion", "roast", "rant", "advice", "everyday")
SPLITS = ("train", "heldout")
_DIR = Path(__file__).parent / "prompts"


@dataclass(frozen=True)
class Prompt:
    """One demo prompt."""

    id: str
    category: str
    prompt: str


def load_prompts(split: str) -> list[Prompt]:
    """The prompts of a split ("train" or "heldout"), in file order."""
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
    with open(_DIR / f"{split}.jsonl", encoding="utf-8") as f:
        return [Prompt(**json.loads(line)) for line in f if line.strip()]
