"""The canary's sequential test: clear evidence decides, thin evidence waits, pairs count, reward hacking is caught."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rlhf_online.canary.sequential import CanaryTestConfig, Evidence, decide, estimate
from rlhf_online.errors import ConfigError, InvalidArgument

DEFAULT = CanaryTestConfig()


def test_clear_evidence_promotes_a_better_canary_and_rolls_back_a_worse_one():
    better = decide(Evidence(canary_up=85, canary_rated=100, stable_up=700, stable_rated=1000), DEFAULT)
    assert better.outcome == "promote" and better.llr >= DEFAULT.promote_at
    assert better.delta == pytest.approx(0.15) and 0 < better.delta_se < 0.1
    assert "85/100" in better.reason and "700/1000" in better.reason and "+15.0 points" in better.reason
    worse = decide(Evidence(canary_up=55, canary_rated=100, stable_up=700, stable_rated=1000), DEFAULT)
    assert worse.outcome == "rollback" and worse.llr <= DEFAULT.rollback_at and worse.delta == pytest.approx(-0.15)
    assert worse.reason.startswith("rollback:") and f"llr {worse.llr:.2f}" in worse.reason


def test_evidence_between_the_thresholds_continues():
    d = decide(Evidence(canary_up=24, canary_rated=32, stable_up=700, stable_rated=1000), DEFAULT)
    assert d.outcome == "continue" and DEFAULT.rollback_at < d.llr < DEFAULT.promote_at


def test_no_decision_before_min_canary_ratings_however_clear():
    config = CanaryTestConfig(min_canary_ratings=30)
    below = decide(Evidence(canary_up=29, canary_rated=29, stable_up=500, stable_rated=1000), config)
    assert below.outcome == "continue" and below.llr > config.promote_at  # the llr alone would promote
    assert "fewer than min_canary_ratings 30" in below.reason
    assert decide(Evidence(canary_up=0, canary_rated=29, stable_up=900, stable_rated=1000), config).outcome == "continue"
    at = decide(Evidence(canary_up=30, canary_rated=30, stable_up=500, stable_rated=1000), config)
    assert at.outcome == "promote"


def test_no_evidence_at_all_continues_with_a_json_ready_record():
    d = decide(Evidence(), DEFAULT)
    assert d.outcome == "continue" and math.isnan(d.delta) and d.llr == 0
    record = d.as_dict()
    assert record["delta"] is None and record["delta_se"] is None and record["outcome"] == "continue"
    json.dumps(record, allow_nan=False)  # strict JSON: no NaN
    assert set(decide(Evidence(85, 100, 700, 1000), DEFAULT).as_dict()) == {"outcome", "reason", "delta", "delta_se",
                                                                           "llr", "hacking"}


@pytest.mark.parametrize("up, expected", [(40, "promote"), (0, "rollback")])
def test_smoothing_keeps_all_up_and_all_down_finite(up, expected):
    d = decide(Evidence(canary_up=up, canary_rated=40, stable_up=0 if up else 40, stable_rated=40), DEFAULT)
    assert d.outcome == expected and math.isfinite(d.llr) and d.delta_se > 0
    # All up on both sides: no effect, and still a variance to divide by.
    delta, var = estimate(40, 40, 400, 400, 0, 0, 1.0)
    assert float(delta) == 0 and float(var) > 0


def test_pairs_alone_decide_and_count_as_canary_looks():
    won = decide(Evidence(pair_wins=48, pairs=60), DEFAULT)
    assert won.outcome == "promote" and won.delta == pytest.approx(2 * 48 / 60 - 1)  # P(win) = 1/2 + delta/2
    assert decide(Evidence(pair_wins=15, pairs=60), DEFAULT).outcome == "rollback"
    few = decide(Evidence(pair_wins=29, pairs=29), DEFAULT)
    assert few.outcome == "continue" and "29 canary completions judged" in few.reason


def test_a_pair_whose_candidates_were_thumbed_is_counted_once_and_its_shared_variance_kept():
    # 40 canary ratings, 40 pairs on the same canary candidates: 40 looks, not 80.
    d = decide(Evidence(canary_up=14, canary_rated=40, stable_up=50, stable_rated=80, pair_wins=15, pairs=40),
               CanaryTestConfig(min_canary_ratings=41))
    assert d.outcome == "continue" and "40 canary completions judged" in d.reason
    # Pairs on other candidates than the thumbed ones (pair_overlap 0) are 40 more looks: past the minimum.
    disjoint = decide(Evidence(canary_up=14, canary_rated=40, stable_up=50, stable_rated=80, pair_wins=15, pairs=40),
                      CanaryTestConfig(min_canary_ratings=41, pair_overlap=0.0))
    assert disjoint.outcome == "rollback"
    _, shared = estimate(140, 200, 1400, 2000, 55, 100, 1.0)
    _, independent = estimate(140, 200, 1400, 2000, 55, 100, 0.0)
    assert float(shared) > float(independent)  # the repeated thumbs are not new evidence


def test_the_array_statistic_is_the_one_decide_uses():
    counts = np.array([[85, 100, 700, 1000, 30, 50], [55, 100, 700, 1000, 0, 0], [0, 0, 0, 0, 45, 60]])
    delta, var = estimate(*counts.T, 1.0)
    for row, d, v in zip(counts, delta, var, strict=True):
        decision = decide(Evidence(*map(int, row)), DEFAULT)
        assert decision.delta == pytest.approx(d) and decision.delta_se == pytest.approx(math.sqrt(v))


def test_the_reward_hacking_guard_turns_a_promotion_into_a_rollback():
    # better_by = 0 ("not worse") can promote a canary whose thumbs-up did not rise: the guard's case.
    config = CanaryTestConfig(better_by=0.0)
    flat = dict(canary_up=700, canary_rated=1000, stable_up=7000, stable_rated=10000)
    assert decide(Evidence(**flat), config).outcome == "promote"
    hacked = decide(Evidence(**flat, reward_gain=0.3, reward_gain_se=0.05), config)
    assert hacked.outcome == "rollback" and hacked.delta == pytest.approx(0)
    assert "learned reward rose by 0.3" in hacked.reason and "users' thumbs-up did not rise" in hacked.reason
    # Not clear enough (gain within hacking_z se), or unknown: the users' promotion stands.
    assert decide(Evidence(**flat, reward_gain=0.08, reward_gain_se=0.05), config).outcome == "promote"
    assert decide(Evidence(**flat, reward_gain=0.3), config).outcome == "promote"
    # The thumbs-up rose with the reward: no hacking.
    rose = dict(flat, canary_up=720)
    assert decide(Evidence(**rose, reward_gain=0.3, reward_gain_se=0.05), config).outcome == "promote"


def test_a_rollback_of_a_canary_that_pleased_the_reward_model_says_so():
    # With the default test, users' thumbs-down already roll such a canary back: the reason names the signature.
    worse = dict(canary_up=50, canary_rated=100, stable_up=700, stable_rated=1000)
    d = decide(Evidence(**worse, reward_gain=0.3, reward_gain_se=0.05), DEFAULT)
    assert d.outcome == "rollback" and "reward hacking: the learned reward rose by 0.3" in d.reason and d.hacking
    assert "reward hacking" not in decide(Evidence(**worse), DEFAULT).reason


@pytest.mark.parametrize("field, value", [
    ("worse_by", 0.0), ("worse_by", 1.0), ("better_by", -0.05), ("alpha", 0.0), ("alpha", 0.5), ("beta", 0.0),
    ("beta", 0.98), ("min_canary_ratings", 0), ("pair_overlap", 1.5), ("hacking_z", -1.0),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}: invalid value {value!r}"):
        CanaryTestConfig(**{field: value})


def test_the_thresholds_are_walds():
    assert DEFAULT.promote_at == pytest.approx(math.log((1 - DEFAULT.beta) / DEFAULT.alpha))
    assert DEFAULT.rollback_at == pytest.approx(math.log(DEFAULT.beta / (1 - DEFAULT.alpha)))


@pytest.mark.parametrize("field, counts", [
    ("canary_up", dict(canary_up=5, canary_rated=4)), ("stable_rated", dict(stable_rated=-1)),
    ("pair_wins", dict(pair_wins=3, pairs=2)),
])
def test_impossible_counts_are_refused_by_name(field, counts):
    with pytest.raises(InvalidArgument, match=f"^{field}:"):
        Evidence(**counts)


def test_clearly_worse_means_the_whole_interval_below_zero():
    assert decide(Evidence(40, 100, 700, 1000), DEFAULT).clearly_worse  # -30 points
    not_better = decide(Evidence(67, 100, 700, 1000), DEFAULT)  # -3 points: rolled back, but not clearly worse
    assert not_better.outcome == "rollback" and not not_better.clearly_worse
    assert not decide(Evidence(), DEFAULT).clearly_worse
