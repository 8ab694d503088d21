"""The per-user cap of reward training: no user's examples weigh more than a share of all."""

from __future__ import annotations

import math

import pytest

from rlhf_online.reward.training import TrainConfig, build_dataset
from rlhf_online.reward.user_cap import cap_level, user_factors
from rlhf_online.store import CompletionRecord, Rater, open_store


def test_the_cap_scales_only_users_over_it_and_holds_the_share():
    weights = {"attacker": 100.0, **{f"honest{k}": 10.0 for k in range(12)}}
    factors, shares = user_factors(weights, 0.1)
    capped = {u: w * factors[u] for u, w in weights.items()}
    assert all(factors[f"honest{k}"] == 1.0 for k in range(12))  # under the cap: untouched
    assert capped["attacker"] / sum(capped.values()) == pytest.approx(0.1, abs=1e-6)
    assert shares.users == 13 and shares.largest_share == pytest.approx(100 / 220)
    assert shares.largest_share_capped == pytest.approx(0.1, abs=1e-6)


def test_no_cap_needed_off_and_too_few_users():
    assert cap_level({"a": 1.0, "b": 1.0, "c": 1.0}, 0.5) == math.inf  # each holds 1/3 < 1/2
    assert cap_level({"a": 50.0, "b": 1.0}, 1.0) == math.inf  # 1 = off
    # Three users cannot each hold at most 10%: they are made equal, at the lightest one's weight.
    factors, shares = user_factors({"a": 30.0, "b": 3.0, "c": 6.0}, 0.1)
    assert factors == {"a": pytest.approx(0.1), "b": 1.0, "c": pytest.approx(0.5)}
    assert shares.largest_share_capped == pytest.approx(1 / 3)


def test_build_dataset_caps_an_attacker_and_reports_the_shares(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.add_completions([CompletionRecord(completion_id=f"c{k}", prompt=f"p{k % 5}", messages=(),
                                                text=f"reply {k}", policy_version="", user_id="x")
                               for k in range(200)])
        for k in range(20):  # 20 honest users, one rating each
            store.add_feedback(f"c{k}", f"honest{k}", "thumbs_up", rater=Rater("acme", "user"))
        for k in range(20, 200):  # one attacker with 180 ratings
            store.add_feedback(f"c{k}", "attacker", "thumbs_down", rater=Rater("evil", "user"))
        uncapped = build_dataset(store, TrainConfig(heldout_percent=0, max_user_share=1.0))
        capped = build_dataset(store, TrainConfig(heldout_percent=0, max_user_share=0.1))
    assert uncapped.train.single_weights == [1.0] * 200
    assert uncapped.train.shares.largest_share > 0.75  # 180 of 200 ratings, and half of each implied pair
    s = capped.train
    attacker = sum(w for u, w in zip(s.single_users, s.single_weights, strict=True) if u == ("evil", "attacker"))
    honest = sum(w for u, w in zip(s.single_users, s.single_weights, strict=True) if u != ("evil", "attacker"))
    # Implied pairs (the attacker's downs vs the honest ups of the same prompts) count half to each side.
    pair_weight = sum(s.pair_weights)
    assert attacker < honest and s.shares.largest_share_capped == pytest.approx(0.1, abs=1e-6)
    assert s.shares.users == 21 and pair_weight > 0
