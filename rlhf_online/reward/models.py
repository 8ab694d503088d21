"""Reward models behind one interface: score(prompts, completions) -> floats, plus a version string."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from rlhf_online.errors import ConfigError


class RewardModel(Protocol):
    """Anything that scores completions of prompts."""

    kind: str
    version: str

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """One score per completion; higher is better."""


class ProfanityReward:
    """1 - p(offensive) from alt-profanity-check: the built-in offline classifier reward."""

    kind = "profanity"
    version = "profanity"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """High for clean text, low for offensive text."""
        from profanity_check import predict_prob

        return [1.0 - float(p) for p in predict_prob(list(completions))] if completions else []


class SentimentReward:
    """VADER compound sentiment of the completion, in [-1, 1]: a scripted reward for tests and benchmarks."""

    kind = "sentiment"
    version = "sentiment"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Warmer text scores higher."""
        from rlhf_online.simulate.judges import sentiment

        return sentiment(completions)


class ClassifierReward:
    """A Hugging Face sequence-classification model's logit for one label (e.g. RoBERTa hate speech's "nothate")."""

    kind = "classifier"

    def __init__(self, path: Path | str, label: str | int, *, batch_size: int = 32, max_length: int = 512) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"reward_classifier: {path} is not a local Hugging Face directory (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        self.index = self._label_index(label)
        self.batch_size, self.max_length = batch_size, max_length
        self.version = f"classifier:{path.name}:{self.model.config.id2label.get(self.index, self.index)}"

    def _label_index(self, label: str | int) -> int:
        labels = {str(v): int(k) for k, v in self.model.config.id2label.items()}
        if str(label) in labels:
            return labels[str(label)]
        if str(label).isdigit() and int(label) < self.model.config.num_labels:
            return int(label)
        raise ConfigError(f"reward_label: {label!r} is not a label of the classifier (have {sorted(labels)})")

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """The chosen label's logit for each completion, in batches."""
        out: list[float] = []
        for i in range(0, len(completions), self.batch_size):
            batch = self.tokenizer(list(completions[i:i + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            out.extend(self.model(**batch).logits[:, self.index].tolist())
        return out


class WeightedReward:
    """A weighted sum of rewards."""

    kind = "weighted"

    def __init__(self, parts: Sequence[tuple[RewardModel, float]]) -> None:
        self.parts = list(parts)

    @property
    def version(self) -> str:
        """The parts' versions with their weights."""
        return "+".join(f"{w:g}*{m.version or m.kind}" for m, w in self.parts)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Sum of weight x score over the parts."""
        total = [0.0] * len(completions)
        for model, weight in self.parts:
            for i, s in enumerate(model.score(prompts, completions)):
                total[i] += weight * s
        return total


KINDS = ("learned", "profanity", "sentiment", "classifier")


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """`learned`, `profanity`, `classifier` or weighted `learned=0.7,profanity=0.3` -> [(name, weight)]."""
    parts = []
    for item in spec.split(","):
        name, _, weight = item.strip().partition("=")
        if name not in KINDS:
            raise ConfigError(f"reward_model: unknown reward {name!r} in {spec!r} ({', '.join(KINDS)})")
        try:
            parts.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise ConfigError(f"reward_model: bad weight {weight!r} in {spec!r}") from None
    return parts
