"""The judges behind simulated users and the demo's report: VADER sentiment and alt-profanity-check.

The learned reward model never sees these; it only sees the ratings that personas derive from them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache


@cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(texts: Sequence[str]) -> list[float]:
    """VADER compound sentiment of each text, in [-1, 1]."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


def toxicity(texts: Sequence[str]) -> list[float]:
    """alt-profanity-check's probability that each text is offensive, in [0, 1]."""
    from profanity_check import predict_prob

    return [float(p) for p in predict_prob(list(texts))] if texts else []


@dataclass(frozen=True)
class Persona:
    """A kind of user: how much they like a warm tone and dislike offensive language, and how noisy they are."""

    name: str
    w_sentiment: float
    w_toxicity: float
    noise: float = 0.1  # probability of a rating flipped at random
    threshold: float = 0.0  # hidden preference above this: thumbs up

    def preference(self, texts: Sequence[str]) -> list[float]:
        """The hidden preference score of each text (higher is better)."""
        return [self.w_sentiment * s - self.w_toxicity * t for s, t in zip(sentiment(texts), toxicity(texts), strict=True)]

    def thumbs_up(self, score: float) -> bool:
        """The noise-free verdict on a reply with this preference score (as the held-out judging counts it)."""
        return score > self.threshold

    def rate(self, texts: Sequence[str], rng: random.Random) -> list[str]:
        """Thumbs up or down for each text, from the hidden preference plus noise."""
        return self.rate_scores(self.preference(texts), rng)

    def rate_scores(self, scores: Sequence[float], rng: random.Random) -> list[str]:
        """Thumbs up or down for replies with these preference scores, each flipped with probability `noise`."""
        out = []
        for score in scores:
            up = self.thumbs_up(score)
            if rng.random() < self.noise:
                up = not up
            out.append("thumbs_up" if up else "thumbs_down")
        return out

    def prefer(self, a: str, b: str, rng: random.Random) -> int:
        """0 if the user prefers a, 1 if b (ties broken at random; noise flips the choice)."""
        return self.prefer_scores(*self.preference([a, b]), rng)

    def prefer_scores(self, sa: float, sb: float, rng: random.Random) -> int:
        """0 if the user prefers the reply scored `sa`, 1 if the one scored `sb` (ties at random; noise flips)."""
        choice = 0 if sa > sb else 1 if sb > sa else rng.randrange(2)
        return 1 - choice if rng.random() < self.noise else choice

    def rank_scores(self, scores: Sequence[float], rng: random.Random) -> list[int]:
        """Indices of replies with these preference scores, best first, by a noisy insertion sort.

        The noise model: the user inserts each reply, in the order given, into the ranking of those
        before it, moving it up past the reply just above while `prefer_scores` (ties at random, each
        comparison flipped with probability `noise`, independently) prefers it. Two replies are one
        `prefer_scores` call on the same dice: [better, worse] exactly as a preference would pick.
        """
        order: list[int] = []
        for i in range(len(scores)):
            place = len(order)
            while place > 0 and self.prefer_scores(scores[order[place - 1]], scores[i], rng) == 1:
                place -= 1
            order.insert(place, i)
        return order


PERSONAS = {
    "polite": Persona("polite", w_sentiment=0.5, w_toxicity=2.0, noise=0.1, threshold=-0.2),
    "positive": Persona("positive", w_sentiment=1.0, w_toxicity=1.0, noise=0.1, threshold=0.1),
}
