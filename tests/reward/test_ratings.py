"""RatingRule: users' ratings as the reward, shrunk towards the model's score, on hand-computed cases."""

from __future__ import annotations

import pytest

from rlhf_online import config
from rlhf_online.config import RewardSettings
from rlhf_online.errors import ConfigError
from rlhf_online.reward.ratings import RatingRule
from rlhf_online.reward.runtime import RewardConfig
from rlhf_online.store import RatingEvidence

DEFAULT = RatingRule()


def test_no_evidence_is_the_model_score() -> None:
    assert DEFAULT.combine(0.7, RatingEvidence()) == 0.7
    assert RatingRule(prior_weight=0).combine(-1.3, RatingEvidence()) == -1.3  # no 0/0


@pytest.mark.parametrize(("evidence", "score", "want"), [
    (RatingEvidence(thumbs_up=1), 0.0, 1.6),  # (0.25*0 + 2*1) / 1.25
    (RatingEvidence(thumbs_up=1), -1.0, 1.4),  # (-0.25 + 2) / 1.25
    (RatingEvidence(thumbs_down=1), 1.0, -1.4),  # (0.25 - 2) / 1.25
    (RatingEvidence(preferred=1), 0.5, 1.7),  # (0.125 + 2) / 1.25
    (RatingEvidence(dispreferred=1), 0.5, -1.5),  # (0.125 - 2) / 1.25
    (RatingEvidence(thumbs_up=1, thumbs_down=1), 0.9, 0.1),  # a split vote: (0.225 + 0) / 2.25
    (RatingEvidence(thumbs_up=3, thumbs_down=1, preferred=2, dispreferred=1), 0.25, 6.0625 / 7.25),  # net +3
])
def test_defaults(evidence: RatingEvidence, score: float, want: float) -> None:
    assert DEFAULT.combine(score, evidence) == pytest.approx(want)


def test_many_agreeing_ratings_approach_the_rating_reward() -> None:
    ups = [DEFAULT.combine(-3.0, RatingEvidence(thumbs_up=n)) for n in (1, 2, 10, 100)]
    assert ups == sorted(ups) and 1.9 < ups[-1] < 2.0


def test_configured_weights() -> None:
    rule = RatingRule(rating_reward=1.0, prior_weight=1.0)
    assert rule.combine(3.0, RatingEvidence(thumbs_up=1)) == 2.0  # (1*3 + 1*1) / 2
    assert rule.combine(3.0, RatingEvidence(thumbs_down=2)) == pytest.approx(1 / 3)  # (3 - 2) / 3
    alone = RatingRule(prior_weight=0)
    assert alone.combine(100.0, RatingEvidence(thumbs_up=2, dispreferred=1)) == pytest.approx(2 / 3)  # 2*(2-1)/3
    assert not alone.needs_model_score(RatingEvidence(thumbs_up=1))
    assert alone.needs_model_score(None) and alone.needs_model_score(RatingEvidence())
    assert DEFAULT.needs_model_score(RatingEvidence(thumbs_up=1))


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"rating_reward": 0.0}, "rating_reward"), ({"rating_reward": -1.0}, "rating_reward"),
    ({"prior_weight": -0.1}, "rating_prior_weight"), ({"prior_weight": float("nan")}, "rating_prior_weight"),
])
def test_bad_weights(kwargs: dict, name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        RatingRule(**kwargs)


def test_evidence_count() -> None:
    assert RatingEvidence(1, 2, 3, 4).count == 10 and RatingEvidence().count == 0


@pytest.mark.parametrize(("env", "name"), [({"RLHF_RATING_REWARD": "0"}, "rating_reward"),
                                           ({"RLHF_RATING_PRIOR_WEIGHT": "-1"}, "rating_prior_weight")])
def test_the_settings_refuse_bad_weights_by_name(env: dict, name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}: invalid value .*; set --{name.replace('_', '-')}"):
        config.build(RewardSettings, None, env=env)


def test_the_settings_reach_the_runtime_config() -> None:
    s = config.build(RewardSettings, None, env={"RLHF_RATING_REWARD": "1.5", "RLHF_RATING_PRIOR_WEIGHT": "0"})
    cfg = config.project(RewardConfig, s)
    assert (cfg.rating_reward, cfg.rating_prior_weight) == (1.5, 0.0)
    default = RewardSettings()
    assert (default.rating_reward, default.rating_prior_weight) == (DEFAULT.rating_reward, DEFAULT.prior_weight)
