"""The held-out split of logged prompts, by a hash of the prompt: one rule for the trainer and the reward model.

A prompt is always on the same side as data grows, and the PPO gate and the reward model's accuracy
are both measured on prompts neither trained on, as long as both services use the same percent
(`heldout_percent`, RLHF_HELDOUT_PERCENT).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf_online.store import CompletionRecord

HELDOUT_PERCENT = 20  # the default share of prompts held out


def is_heldout(prompt: str, percent: int) -> bool:
    """Whether `prompt` is on the held-out side: its sha256 bucket (of 100) is below `percent`."""
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 100 < percent


def prompt_key(c: CompletionRecord) -> str:
    """What identifies 'the same prompt' of a logged completion: its text, or its chat messages."""
    return c.prompt or json.dumps(c.messages)
