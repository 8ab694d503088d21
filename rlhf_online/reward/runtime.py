"""The reward service's state: the configured reward, the served learned version, training and retraining."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rlhf_online import metrics
from rlhf_online.errors import ConfigError, InvalidArgument
from rlhf_online.mainthread import MainThreadRunner
from rlhf_online.reward.encoder import TextEncoder
from rlhf_online.reward.learned import UntrainedReward
from rlhf_online.reward.models import (
    ClassifierReward,
    ProfanityReward,
    RewardModel,
    SentimentReward,
    WeightedReward,
    parse_spec,
)
from rlhf_online.reward.registry import RewardRegistry
from rlhf_online.reward.training import TrainConfig, train_and_gate
from rlhf_online.store import Store

log = logging.getLogger("rlhf_online.reward")


@dataclass(frozen=True)
class RewardConfig:
    """What the reward runtime needs; built from the Reward service's settings (their --help documents each)."""

    reward_model: str  # a reward name or a weighted mix, parsed by reward.models.parse_spec
    reward_classifier: Path | None
    reward_label: str
    encoder: str
    encoder_layer: int
    head_hidden: int
    device: str
    reward_dir: Path
    pin_version: str
    retrain_min_feedback: int
    retrain_growth: float
    retrain_interval_seconds: float
    min_train_examples: int
    heldout_percent: int
    train_epochs: int
    max_score_items: int
    max_text_chars: int


class RewardRuntime:
    """Scores with the configured reward; trains, gates and swaps the learned part; retrains in the background."""

    def __init__(self, config: RewardConfig, store: Store) -> None:
        self.config, self.store = config, store
        self.spec = parse_spec(config.reward_model)
        names = {n for n, _ in self.spec}
        if "classifier" in names and not config.reward_classifier:
            raise ConfigError("reward_classifier: required when reward_model uses 'classifier'")
        self.encoder = (TextEncoder(config.encoder or None, layer=config.encoder_layer, device=config.device)
                        if "learned" in names else None)
        self.registry = RewardRegistry(config.reward_dir)
        self.classifier = (ClassifierReward(config.reward_classifier, config.reward_label or 0)
                           if "classifier" in names else None)
        self.train_config = TrainConfig(heldout_percent=config.heldout_percent, epochs=config.train_epochs,
                                        head_hidden=config.head_hidden,
                                        min_train_examples=config.min_train_examples)
        self._train_lock = threading.Lock()
        self._learned: RewardModel = UntrainedReward()
        self._manifest: dict = {}
        self._seen_at_last_train = 0
        self._stop = threading.Event()
        self.runner = MainThreadRunner()  # scoring runs on the main thread once serve() hands it over
        self._load_learned(config.pin_version or self.registry.current())

    # ------------------------------------------------------------ scoring

    @property
    def model(self) -> RewardModel:
        """The reward as configured, with the learned part at its served version."""
        parts: list[tuple[RewardModel, float]] = []
        for name, weight in self.spec:
            part = {"learned": self._learned, "profanity": ProfanityReward(), "sentiment": SentimentReward(),
                    "classifier": self.classifier}[name]
            parts.append((part, weight))
        return parts[0][0] if len(parts) == 1 and parts[0][1] == 1.0 else WeightedReward(parts)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[list[float], str]:
        """Scores of a batch of items, and the reward version that produced them."""
        if not completions:
            raise InvalidArgument("items", "must not be empty")
        if len(completions) > self.config.max_score_items:
            raise InvalidArgument("items", f"at most {self.config.max_score_items} items, got {len(completions)}")
        limit = self.config.max_text_chars
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            if len(p) > limit or len(c) > limit:
                which = "prompt" if len(p) > limit else "completion"
                raise InvalidArgument(f"items[{i}].{which}", f"at most {limit} characters")
        model = self.model  # one consistent model for the whole batch, even if a swap happens meanwhile
        scores = self.runner.call(model.score, prompts, completions)
        for s in scores:
            metrics.REWARD_SCORES.observe(s)
        return scores, model.version

    # ------------------------------------------------------------ the learned part

    def info(self) -> tuple[str, dict[str, float], int]:
        """(version served, the learned model's metrics, feedback it was trained on)."""
        m = self._manifest
        return self.model.version, dict(m.get("metrics", {})), int(m.get("feedback_seen", 0))

    def _load_learned(self, version: str) -> None:
        """Serve a learned version ("" = untrained); a pinned version stays even when newer ones are promoted."""
        if not version or self.encoder is None:
            return
        self._manifest = self.registry.manifest(version)
        self._learned = self.registry.load(version, self.encoder)
        metrics.REWARD_MODEL_VERSION.set(metrics.version_number(version))
        metrics.REWARD_FEEDBACK_SEEN.set(self._manifest.get("feedback_seen", 0))
        for kind in ("pairwise_accuracy", "pointwise_accuracy"):
            if kind in self._manifest.get("metrics", {}):
                metrics.REWARD_ACCURACY.labels(kind).set(self._manifest["metrics"][kind])
        log.info("reward model served", extra={"version": version})

    def train(self) -> tuple[dict, bool, str]:
        """Retrain from the store now; swap the served model if the candidate passed its gate."""
        if self.encoder is None:
            return {}, False, "the configured reward has no learned part"
        with self._train_lock:
            seen = self._feedback_count()
            t0 = time.time()
            manifest, promoted, reason = train_and_gate(self.registry, self.store, self.encoder, self.train_config)
            self._seen_at_last_train = seen
            if manifest.get("version"):
                metrics.REWARD_TRAINING_SECONDS.observe(time.time() - t0)
            metrics.REWARD_TRAININGS.labels("promoted" if promoted else "rejected" if manifest.get("version")
                                            else "skipped").inc()
            if promoted and not self.config.pin_version:
                self._load_learned(manifest["version"])
            return manifest, promoted, reason

    def _feedback_count(self) -> int:
        return self.store.count_feedback() + self.store.count_preferences()

    def retrain_due(self, feedback: int) -> bool:
        """Enough new feedback for a background retrain: the configured count, and the configured growth."""
        new = feedback - self._seen_at_last_train
        return new >= max(self.config.retrain_min_feedback, self.config.retrain_growth * self._seen_at_last_train)

    def retrain_forever(self) -> None:
        """Background loop: retrain once enough new feedback arrived since the last training."""
        while not self._stop.wait(self.config.retrain_interval_seconds):
            try:
                if self.retrain_due(self._feedback_count()):
                    self.train()
            except Exception:  # a failed training is logged and counted; the served model stays, the next poll retries
                metrics.REWARD_TRAININGS.labels("failed").inc()
                log.exception("background reward training failed")

    def start_retrainer(self) -> threading.Thread:
        """Run retrain_forever in a daemon thread."""
        t = threading.Thread(target=self.retrain_forever, name="reward-retrainer", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        """Stop the background retrainer."""
        self._stop.set()
