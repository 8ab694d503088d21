"""Versioned learned reward models: r000001/ … (head files + manifest.json), CURRENT naming the promoted one.

The versioning, atomic writes and the pointer are rlhf_online.registry's; training and the promotion
gate are in rlhf_online.reward.training.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_online.registry import REWARD_PREFIX, VersionedRegistry
from rlhf_online.reward.encoder import TextEncoder
from rlhf_online.reward.learned import LearnedReward


class RewardRegistry(VersionedRegistry):
    """The directory of trained reward models and which one is promoted."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, REWARD_PREFIX, "reward model version")

    def load(self, version: str, encoder: TextEncoder) -> LearnedReward:
        """A version's model, verified against its manifest."""
        self.manifest(version)
        return LearnedReward.load(self.root / version, encoder, version)
