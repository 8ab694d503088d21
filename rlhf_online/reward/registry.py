"""Versioned learned reward models: r000001/ … written atomically, CURRENT names the promoted one."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict
from pathlib import Path

from rlhf_online.artifacts import publish_dir, verify_dir, write_json_atomically
from rlhf_online.errors import NotFound
from rlhf_online.reward.encoder import TextEncoder
from rlhf_online.reward.learned import LearnedReward
from rlhf_online.reward.training import TrainConfig, accuracy_margin, build_dataset, evaluate, train
from rlhf_online.store import Store

log = logging.getLogger("rlhf_online.reward")
VERSION_RE = re.compile(r"^r\d{6}$")


class RewardRegistry:
    """The directory of trained reward models and which one is promoted."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def versions(self) -> list[str]:
        """Every complete version, oldest first."""
        return sorted(p.name for p in self.root.iterdir() if VERSION_RE.match(p.name) and (p / "manifest.json").exists())

    def current(self) -> str:
        """The promoted version, or "" before the first promotion."""
        path = self.root / "CURRENT.json"
        return json.loads(path.read_text())["version"] if path.exists() else ""

    def manifest(self, version: str) -> dict:
        """A version's verified manifest (NotFound if it does not exist)."""
        if not VERSION_RE.match(version) or not (self.root / version).is_dir():
            raise NotFound("reward model version", version)
        return verify_dir(self.root / version)

    def load(self, version: str, encoder: TextEncoder) -> LearnedReward:
        """A version's model, verified against its manifest."""
        self.manifest(version)
        return LearnedReward.load(self.root / version, encoder, version)

    def promote(self, version: str) -> None:
        """Serve `version` from now on (CURRENT replaced atomically)."""
        self.manifest(version)
        write_json_atomically(self.root / "CURRENT.json", {"version": version, "promoted_at": time.time()})

    def _next_version(self) -> str:
        existing = [int(v[1:]) for v in self.versions()]
        return f"r{max(existing, default=0) + 1:06d}"

    def train_and_gate(self, store: Store, encoder: TextEncoder, cfg: TrainConfig) -> tuple[dict, bool, str]:
        """Train a candidate on all feedback; promote it unless it is worse than the current one beyond noise.

        Returns (the candidate's manifest, promoted, reason). Every trained candidate is kept on disk,
        promoted or not, so that its metrics can be audited.
        """
        t0 = time.time()
        data = build_dataset(store, cfg)
        if data.train.examples < cfg.min_train_examples:
            reason = f"not enough feedback: {data.train.examples} training examples < {cfg.min_train_examples}"
            return {"version": "", "metrics": {}, "feedback_seen": data.feedback_seen}, False, reason
        version = self._next_version()
        model = train(encoder, data, cfg, version)
        metrics = evaluate(model, encoder, data.heldout)
        metrics["train_examples"] = float(data.train.examples)
        metrics["train_seconds"] = round(time.time() - t0, 3)
        current = self.current()
        promoted, reason = True, "first reward model" if not current else ""
        if current:
            previous = evaluate(self.load(current, encoder), encoder, data.heldout)
            new_acc, old_acc = metrics.get("pairwise_accuracy"), previous.get("pairwise_accuracy")
            metrics["previous_pairwise_accuracy"] = old_acc if old_acc is not None else float("nan")
            if new_acc is None or old_acc is None:
                reason = "no held-out pairs to compare on; promoted on training loss"
            else:
                margin = accuracy_margin(old_acc, len(data.heldout.pairs))
                promoted = new_acc >= old_acc - margin
                reason = (f"held-out pairwise accuracy {new_acc:.3f} vs {current} {old_acc:.3f} "
                          f"(allowed drop {margin:.3f} on {len(data.heldout.pairs)} pairs)")
        manifest = {"version": version, "parent": current, "created_at": time.time(), "metrics": metrics,
                    "feedback_seen": data.feedback_seen, "train_config": asdict(cfg), "promoted": promoted,
                    "reason": reason, "encoder": str(encoder.path)}
        publish_dir(self.root / version, model.save, manifest=manifest)
        if promoted:
            self.promote(version)
        log.info("reward model candidate", extra={"version": version, "promoted": promoted, "reason": reason})
        return manifest, promoted, reason
