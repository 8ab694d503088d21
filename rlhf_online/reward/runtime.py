"""The reward service's state: the configured reward, the served learned version, training and retraining."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rlhf_online import metrics
from rlhf_online.errors import ConfigError, InvalidArgument, NotFound
from rlhf_online.mainthread import MainThreadRunner
from rlhf_online.models.provision import pick_dtype
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
from rlhf_online.reward.ratings import RatingRule
from rlhf_online.reward.registry import RewardRegistry
from rlhf_online.reward.training import TrainConfig, train_and_gate
from rlhf_online.reward.window import FeedbackWindow
from rlhf_online.store import RatingEvidence, Store

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
    dtype: str  # the encoder's compute: auto (bf16 where native), float32, bfloat16
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
    rating_reward: float  # with rating_prior_weight: the RatingRule that scores rated completions
    rating_prior_weight: float
    max_user_share: float  # the per-user cap of reward training (TrainConfig.max_user_share)
    window_examples: int  # the training window (TrainConfig.window_examples)


class RewardRuntime:
    """Scores with the configured reward; trains, gates and swaps the learned part; retrains in the background."""

    def __init__(self, config: RewardConfig, store: Store) -> None:
        self.config, self.store = config, store
        self.spec = parse_spec(config.reward_model)
        names = {n for n, _ in self.spec}
        if "classifier" in names and not config.reward_classifier:
            raise ConfigError("reward_classifier: required when reward_model uses 'classifier'")
        self.encoder = (TextEncoder(config.encoder or None, layer=config.encoder_layer, device=config.device,
                                    compute_dtype=pick_dtype(config.dtype, config.device))
                        if "learned" in names else None)
        self.registry = RewardRegistry(config.reward_dir)
        self.classifier = (ClassifierReward(config.reward_classifier, config.reward_label or 0)
                           if "classifier" in names else None)
        self.train_config = TrainConfig(heldout_percent=config.heldout_percent, epochs=config.train_epochs,
                                        head_hidden=config.head_hidden,
                                        min_train_examples=config.min_train_examples,
                                        max_user_share=config.max_user_share,
                                        window_examples=config.window_examples)
        # The training data, read incrementally by the retrainer (a refresh costs what is new, not the history).
        self.window = FeedbackWindow(store, config.window_examples)
        self.rule = RatingRule(rating_reward=config.rating_reward, prior_weight=config.rating_prior_weight)
        self._train_lock = threading.Lock()
        self._window_lock = threading.RLock()  # a refresh never runs while a training reads the window
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

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              completion_ids: Sequence[str] | None = None) -> tuple[list[float], str]:
        """Scores of a batch of items, and the reward version that produced them.

        An item with a completion id that users rated is scored by `self.rule` from their ratings and
        the model's score; the rest ("" or no ids at all) by the model alone.
        """
        self._check_items(prompts, completions, completion_ids)
        evidence = self._evidence(completion_ids or [""] * len(completions))
        model = self.model  # one consistent model for the whole batch, even if a swap happens meanwhile
        need = [i for i in range(len(completions)) if self.rule.needs_model_score(evidence.get(i))]
        learned = self._model_scores(model, [prompts[i] for i in need], [completions[i] for i in need])
        by_item = dict(zip(need, learned, strict=True))
        # An item without a model score is one whose rule ignores it (prior_weight 0): 0.0 stands in.
        scores = [self.rule.combine(by_item.get(i, 0.0), evidence[i]) if i in evidence else by_item[i]
                  for i in range(len(completions))]
        for s in scores:
            metrics.REWARD_SCORES.observe(s)
        metrics.REWARD_SCORED_ITEMS.labels("ratings").inc(len(evidence))
        metrics.REWARD_SCORED_ITEMS.labels("model").inc(len(scores) - len(evidence))
        return scores, model.version

    def _model_scores(self, model: RewardModel, prompts: list[str], completions: list[str]) -> list[float]:
        """The model's scores, computed on the main thread (none asked: no call)."""
        return self.runner.call(model.score, prompts, completions) if completions else []

    def _check_items(self, prompts: Sequence[str], completions: Sequence[str],
                     completion_ids: Sequence[str] | None) -> None:
        """InvalidArgument naming the field unless the batch is within the configured limits."""
        if not completions:
            raise InvalidArgument("items", "must not be empty")
        if len(completions) > self.config.max_score_items:
            raise InvalidArgument("items", f"at most {self.config.max_score_items} items, got {len(completions)}")
        if completion_ids is not None and len(completion_ids) != len(completions):
            raise InvalidArgument("completion_ids", f"one per item ({len(completions)}), got {len(completion_ids)}")
        limit = self.config.max_text_chars
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            if len(p) > limit or len(c) > limit:
                which = "prompt" if len(p) > limit else "completion"
                raise InvalidArgument(f"items[{i}].{which}", f"at most {limit} characters")

    def _evidence(self, completion_ids: Sequence[str]) -> dict[int, RatingEvidence]:
        """Users' ratings by item index, for the items with a rated completion id (NotFound for an unknown id)."""
        ids = [cid for cid in completion_ids if cid]
        if not ids:
            return {}
        rated = self.store.rating_evidence(ids)
        # Only unrated ids can be unknown: a rating or preference needs its completion to exist.
        known = self.store.get_completions(cid for cid in ids if cid not in rated)
        for i, cid in enumerate(completion_ids):
            if cid and cid not in rated and cid not in known:
                raise NotFound(f"items[{i}].completion_id: completion", cid)
        return {i: rated[cid] for i, cid in enumerate(completion_ids) if cid in rated}

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
        with self._train_lock, self._window_lock:
            seen = self._feedback_count()
            t0 = time.time()
            manifest, promoted, reason = train_and_gate(self.registry, self.store, self.encoder, self.train_config,
                                                        self.window)
            self._seen_at_last_train = seen
            if manifest.get("version"):
                metrics.REWARD_TRAINING_SECONDS.observe(time.time() - t0)
            metrics.REWARD_TRAININGS.labels("promoted" if promoted else "rejected" if manifest.get("version")
                                            else "skipped").inc()
            if promoted and not self.config.pin_version:
                self._load_learned(manifest["version"])
            return manifest, promoted, reason

    def _feedback_count(self) -> int:
        """Thumbs, preferences and rankings read so far (the window refreshed first): what a retrain is due on."""
        with self._window_lock:  # the retrainer and a TrainReward call may both refresh
            self.window.refresh()
            return self.window.seen

    def retrain_due(self, feedback: int) -> bool:
        """Enough new feedback for a background retrain: the configured count, and the configured growth.

        Growth is of the data a retrain uses (at most the window), so retrains do not thin out as history grows.
        """
        new = feedback - self._seen_at_last_train
        used = min(self._seen_at_last_train, 3 * self.config.window_examples)
        return new >= max(self.config.retrain_min_feedback, self.config.retrain_growth * used)

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
