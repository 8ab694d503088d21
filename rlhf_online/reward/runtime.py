"""The reward service's state: the configured reward, the served learned version, training and retraining."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from rlhf_online import metrics
from rlhf_online.config import RewardSettings
from rlhf_online.errors import InvalidArgument
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


class RewardRuntime:
    """Scores with the configured reward; trains, gates and swaps the learned part; retrains in the background."""

    def __init__(self, settings: RewardSettings, store: Store) -> None:
        self.settings, self.store = settings, store
        self.spec = parse_spec(settings.reward_model)
        names = {n for n, _ in self.spec}
        self.encoder = (TextEncoder(settings.encoder or None, layer=settings.encoder_layer, device=settings.device)
                        if "learned" in names else None)
        self.registry = RewardRegistry(settings.reward_dir)
        self.classifier = (ClassifierReward(settings.reward_classifier, settings.reward_label or 0)
                           if "classifier" in names else None)
        self.train_config = TrainConfig(heldout_percent=settings.heldout_percent, epochs=settings.train_epochs,
                                        head_hidden=settings.head_hidden,
                                        min_train_examples=settings.min_train_examples)
        self._train_lock = threading.Lock()
        self._learned: RewardModel = UntrainedReward()
        self._manifest: dict = {}
        self._seen_at_last_train = 0
        self._stop = threading.Event()
        self.runner = MainThreadRunner()  # scoring runs on the main thread once serve() hands it over
        self._load_learned(settings.pin_version or self.registry.current())

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
        if len(completions) > self.settings.max_score_items:
            raise InvalidArgument("items", f"at most {self.settings.max_score_items} items, got {len(completions)}")
        limit = self.settings.max_text_chars
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
            if promoted and not self.settings.pin_version:
                self._load_learned(manifest["version"])
            return manifest, promoted, reason

    def _feedback_count(self) -> int:
        return self.store.count_feedback() + self.store.count_preferences()

    def retrain_due(self, feedback: int) -> bool:
        """Enough new feedback for a background retrain: the configured count, and the configured growth."""
        new = feedback - self._seen_at_last_train
        return new >= max(self.settings.retrain_min_feedback, self.settings.retrain_growth * self._seen_at_last_train)

    def retrain_forever(self) -> None:
        """Background loop: retrain once enough new feedback arrived since the last training."""
        while not self._stop.wait(self.settings.retrain_interval_seconds):
            try:
                if self.retrain_due(self._feedback_count()):
                    self.train()
            except Exception:  # a failed training is logged; the served model stays
                log.exception("background reward training failed")

    def start_retrainer(self) -> threading.Thread:
        """Run retrain_forever in a daemon thread."""
        t = threading.Thread(target=self.retrain_forever, name="reward-retrainer", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        """Stop the background retrainer."""
        self._stop.set()
