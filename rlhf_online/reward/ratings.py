"""How users' own ratings of a completion and the learned model's score of it combine into one reward.

A completion users rated (a thumbs up or down, either side of a preference, or a place in a
ranking) is rewarded by what they said; the learned model only fills in where nobody said anything.
The rule is a shrinkage estimate: each rating or preference side is one observation worth
+rating_reward (thumbs up, or the chosen side) or -rating_reward (thumbs down, or the rejected
side); each ranking is one observation of each of its k completions, worth rating_reward times
(k - 1 - 2 * place) / (k - 1) (the best +1, the worst -1, the middle 0); and the model's score
counts as `prior_weight` observations of its own:

    reward = (prior_weight * model_score + rating_reward * (ups + chosen - downs - rejected + ranked_net))
             / (prior_weight + ratings)

With no ratings that is the model's score; one thumbs up with the defaults (2.0, 0.25) gives
(0.25 * s + 2) / 1.25 = 0.2 * s + 1.6, and the more users agree the closer it gets to ±2.

Why these units and weights: the learned model's scores are centred logits, P(thumbs up) =
sigmoid(score + bias) and P(a preferred over b) = sigmoid(score_a - score_b) (reward/learned.py),
so ±2 is what the model itself would give a reply it was confident about (a probability near
0.88). A user's rating of this very completion is better evidence than a model that ranks 0.55-0.70
of held-out pairs right, so by default one rating outweighs the model four to one. The model's
score still counts: it breaks a split vote (one up, one down: 0.25 * s / 2.25), and it keeps a
single rating from being the whole story. With prior_weight 0 the ratings alone decide.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_online.errors import ConfigError
from rlhf_online.store import RatingEvidence


@dataclass(frozen=True)
class RatingRule:
    """Users' ratings as the reward, shrunk towards the model's score (see the module docstring)."""

    rating_reward: float = 2.0  # the reward of one thumbs up or chosen side (its negative: down or rejected)
    prior_weight: float = 0.25  # how many ratings the model's score is worth (0 = ratings alone)

    def __post_init__(self) -> None:
        """ConfigError naming the setting when a weight is out of range."""
        if not self.rating_reward > 0:
            raise ConfigError(f"rating_reward: invalid value {self.rating_reward!r} (want > 0)")
        if not self.prior_weight >= 0:
            raise ConfigError(f"rating_prior_weight: invalid value {self.prior_weight!r} (want >= 0)")

    def combine(self, model_score: float, evidence: RatingEvidence) -> float:
        """The reward of a completion the model scored `model_score` and users rated as `evidence`."""
        if evidence.count == 0:
            return model_score
        return (self.prior_weight * model_score + self.rating_reward * evidence.net) / (self.prior_weight + evidence.count)

    def needs_model_score(self, evidence: RatingEvidence | None) -> bool:
        """Whether `combine` reads the model's score for a completion with this evidence."""
        return evidence is None or evidence.count == 0 or self.prior_weight > 0
