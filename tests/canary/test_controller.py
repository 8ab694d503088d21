"""The promotion controller on a real registry and store, with a clock the test moves: no model, no sleeps."""

from __future__ import annotations

import math
import shutil

import pytest

from rlhf_online import metrics
from rlhf_online.adapters.registry import AdapterRegistry
from rlhf_online.canary.config import CanaryConfig
from rlhf_online.canary.controller import CanaryController, head
from rlhf_online.canary.sequential import CanaryTestConfig
from rlhf_online.store import CompletionRecord, open_store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    clock = Clock()
    controller = CanaryController(CanaryConfig(canary_timeout_seconds=600), CanaryTestConfig(), registry, store, clock)
    yield registry, store, clock, controller
    store.close()


def publish(registry: AdapterRegistry, parent: str = "", **metrics_: float) -> str:
    return registry.publish(lambda d: (d / "adapter.bin").write_bytes(b"w"), base_model="tiny", parent=parent,
                            metrics=metrics_)


def go_live(registry: AdapterRegistry, controller: CanaryController) -> tuple[str, str]:
    """A stable version as CURRENT and a candidate trained from it, queued and made the canary: (stable, canary)."""
    stable = publish(registry)
    registry.activate(stable)
    canary = publish(registry, parent=stable)
    controller.queue(canary)
    controller.step()
    assert registry.canary() == canary
    return stable, canary


def rate(store, clock: Clock, version: str, user: str, ups: int, downs: int, tag: str) -> None:
    """`ups` + `downs` rated replies of `version` to `user`, served one second from now."""
    records = [CompletionRecord(completion_id=f"{tag}{i}", prompt="p", messages=(), text="t", policy_version=version,
                                user_id=user, created_at=clock.now + 1) for i in range(ups + downs)]
    store.add_completions(records)
    for i, r in enumerate(records):
        store.add_feedback(r.completion_id, user, "thumbs_up" if i < ups else "thumbs_down")


def decisions(label: str) -> float:
    return metrics.CANARY_DECISIONS.labels(label)._value.get()


def test_a_worse_canary_is_rolled_back_and_candidates_trained_from_it_discarded(setup):
    registry, store, clock, controller = setup
    stable = publish(registry)
    registry.activate(stable)
    bad = publish(registry, parent=stable)
    controller.queue(bad)
    assert head(registry) == bad  # rounds continue from the candidate, not from CURRENT
    assert controller.step() is None and registry.canary() == bad  # live at once: nothing else was
    later = publish(registry, parent=bad)  # a round trained on top of the canary meanwhile
    controller.queue(later)
    assert head(registry) == later
    rate(store, clock, stable, "someone", 70, 30, "s")
    rate(store, clock, bad, "someone", 10, 30, "c")
    before = decisions("rolled_back")
    record = controller.step()
    assert record["outcome"] == "rolled_back" and record["reason"].startswith("rollback") and record["rejects_line"]
    assert record["evidence"]["canary_rated"] == 40 and record["evidence"]["stable_rated"] == 100
    assert (registry.current(), registry.canary()) == (stable, "") and decisions("rolled_back") == before + 1
    assert registry.decision(later)["outcome"] == "discarded"
    assert head(registry) == stable  # training restarts from what users accepted


def test_a_canary_not_shown_better_is_rolled_back_but_its_line_goes_on(setup):
    registry, store, clock, controller = setup
    stable, first = go_live(registry, controller)  # one round in: hardly different from the stable version
    later = publish(registry, parent=first)  # more rounds of training on top of it
    controller.queue(later)
    rate(store, clock, stable, "u", 700, 300, "s")
    rate(store, clock, first, "u", 67, 33, "c")  # 67% vs 70%: not better, not clearly worse
    record = controller.step()
    assert record["outcome"] == "rolled_back" and record["rejects_line"] is False
    assert registry.current() == stable and registry.canary() == later  # judged next, on its own
    assert registry.decision(later)["outcome"] == "live"


def test_a_better_canary_is_promoted_and_the_newest_queued_candidate_goes_live_next(setup):
    registry, store, clock, controller = setup
    stable, good = go_live(registry, controller)
    middle = publish(registry, parent=good)
    newest = publish(registry, parent=middle)
    controller.queue(middle)
    controller.queue(newest)
    rate(store, clock, stable, "u", 50, 50, "s")
    rate(store, clock, good, "u", 45, 5, "c")
    record = controller.step()
    assert record["outcome"] == "promoted" and record["test"]["delta"] > 0.3
    assert registry.current() == good and registry.canary() == newest  # the newest carries middle's updates
    assert registry.decision(middle)["outcome"] == "superseded"
    assert registry.decision(newest)["outcome"] == "live" and registry.decision(newest)["stable"] == good


def test_an_undecided_canary_times_out_into_a_rollback(setup):
    registry, store, clock, controller = setup
    stable, quiet = go_live(registry, controller)
    clock.now += 599
    assert controller.step() is None and registry.canary() == quiet
    assert registry.decision(quiet)["test"]["outcome"] == "continue"  # the evidence so far, recorded
    clock.now += 2
    record = controller.step()
    assert record["outcome"] == "rolled_back" and "timeout 600 s" in record["reason"] and registry.canary() == ""


def test_an_undecided_canary_is_replaced_by_a_candidate_trained_from_it(tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    clock = Clock()
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        controller = CanaryController(CanaryConfig(canary_replace_after=30), CanaryTestConfig(), registry, store,
                                      clock)
        stable, first = go_live(registry, controller)
        rate(store, clock, stable, "u", 140, 60, "s")
        rate(store, clock, first, "u", 15, 5, "a")  # 20 judged: fewer than canary_replace_after
        later = publish(registry, parent=first)  # a round trained on top of the canary
        controller.queue(later)
        assert controller.step() is None and registry.canary() == first
        rate(store, clock, first, "u", 6, 4, "b")  # 30 judged, 70% vs 70%: undecided
        record = controller.step()
        assert record["outcome"] == "superseded" and "undecided after 30+" in record["reason"]
        assert record["test"]["outcome"] == "continue" and record["test"]["llr"] <= 0
        assert registry.canary() == later and registry.decision(later)["stable"] == stable
        assert registry.current() == stable  # nothing promoted: the replacement is tested from zero

        # Undecided after 30, but nothing newer trained from it: it stays, and its test goes on.
        clock.now += 10
        rate(store, clock, later, "u", 21, 9, "c")
        assert controller.step() is None and registry.canary() == later
        assert registry.decision(later)["test"]["llr"] < 0
        # Leaning to promotion (79% vs 70%), it keeps its evidence even with a newer candidate queued.
        rate(store, clock, later, "u", 12, 0, "d")
        newest = publish(registry, parent=later)
        controller.queue(newest)
        assert controller.step() is None and registry.canary() == later
        assert registry.decision(later)["test"]["outcome"] == "continue" and registry.decision(later)["test"]["llr"] > 0


def test_an_operator_promotion_or_rollback_is_recorded_as_theirs(setup):
    registry, store, clock, controller = setup
    stable, first = go_live(registry, controller)
    registry.promote()  # `rlhf-online policies promote`
    controller.step()
    assert registry.decision(first)["outcome"] == "promoted" and registry.decision(first)["by"] == "operator"
    second = publish(registry, parent=first)
    controller.queue(second)
    controller.step()
    registry.activate(second)  # ActivatePolicy naming the canary: a promotion by hand
    controller.step()
    assert (registry.current(), registry.canary()) == (second, "")
    assert registry.decision(second)["outcome"] == "promoted"
    third = publish(registry, parent=second)
    controller.queue(third)
    controller.step()
    registry.rollback()  # `rlhf-online policies rollback` drops the canary
    controller.step()
    assert registry.decision(third)["outcome"] == "rolled_back" and registry.current() == second


def test_the_reward_gain_sums_the_gates_along_the_lineage(setup):
    registry, store, clock, controller = setup
    stable = publish(registry)
    a = publish(registry, parent=stable, **{"eval/reward": 0.5, "eval/reward_current": 0.2, "eval/reward_diff_se": 0.03})
    b = publish(registry, parent=a, **{"eval/reward": 0.9, "eval/reward_current": 0.5, "eval/reward_diff_se": 0.04})
    gain, se = controller.reward_gain(b, stable)
    assert gain == pytest.approx(0.7) and se == pytest.approx(0.05)
    unknown = publish(registry, parent=b)  # a step without the gate's numbers: unknown
    assert all(math.isnan(x) for x in controller.reward_gain(unknown, stable))


def test_prune_keeps_the_line_of_candidates_and_a_lost_one_is_discarded_not_a_stuck_controller(setup):
    registry, store, clock, controller = setup
    stable = publish(registry)
    registry.activate(stable)
    old = publish(registry, parent=stable)
    controller.queue(old)
    newer = publish(registry, parent=old)
    controller.queue(newer)
    unrelated = publish(registry)
    publish(registry)
    registry.prune(keep=1)  # queued candidates and their line back to CURRENT stay
    assert unrelated not in registry.versions() and {stable, old, newer} <= set(registry.versions())
    shutil.rmtree(registry.root / old)  # lost anyway (say, by hand): its record stays, its descendants' line is cut
    controller.step()
    assert registry.decision(old)["outcome"] == "discarded" and registry.decision(newer)["outcome"] == "discarded"
    assert registry.canary() == "" and head(registry) == stable


def test_with_same_users_the_canary_is_compared_with_its_own_users_stable_ratings(tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    clock = Clock()
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        controller = CanaryController(CanaryConfig(canary_same_users=True), CanaryTestConfig(),  # 10 ratings: no verdict
                                      registry, store, clock)
        stable, canary = go_live(registry, controller)
        rate(store, clock, canary, "generous", 9, 1, "c")
        rate(store, clock, stable, "harsh", 10, 90, "sh")  # everyone else: they would make the canary look better
        rate(store, clock, stable, "generous", 4, 1, "sg")  # the canary's user, on the stable side of pairs
        controller.step()  # 5 stable ratings of its own users, fewer than 10: everyone's count
        assert registry.decision(canary)["evidence"]["stable_rated"] == 105
        rate(store, clock, stable, "generous", 5, 0, "sg2")
        controller.step()
        evidence = registry.decision(canary)["evidence"]
        assert (evidence["stable_up"], evidence["stable_rated"]) == (9, 10)


# Against the stable 70%: 85% (llr 2.2, past halfway to 3.56), 80% (llr 1.1: leaning to better, not
# halfway) and 65% (llr < 0), all undecided by the test itself below its 30 ratings.
@pytest.mark.parametrize("canary_ups, outcome", [(17, "promoted"), (16, "rolled_back"), (13, "rolled_back")])
def test_an_undecided_canary_is_decided_by_its_lean_at_canary_max_looks(tmp_path, canary_ups, outcome):
    registry = AdapterRegistry(tmp_path / "adapters")
    clock = Clock()
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        controller = CanaryController(CanaryConfig(canary_max_looks=20), CanaryTestConfig(), registry, store, clock)
        stable, canary = go_live(registry, controller)
        rate(store, clock, stable, "u", 140, 60, "s")  # 70%
        rate(store, clock, canary, "u", canary_ups - 1, 20 - canary_ups, "a")  # 19 judged
        assert controller.step() is None and registry.canary() == canary  # below the limit: the test goes on
        rate(store, clock, canary, "u", 1, 0, "b")  # 20 judged
        before = decisions(f"truncated_{outcome}")
        record = controller.step()
        assert record["test"]["outcome"] == "continue"  # the test itself had not decided ...
        assert record["outcome"] == outcome and "canary_max_looks 20" in record["reason"]  # ... its lean did
        assert (record["test"]["llr"] >= CanaryTestConfig().promote_at / 2) is (outcome == "promoted")
        assert registry.canary() == "" and registry.current() == (canary if outcome == "promoted" else stable)
        assert decisions(f"truncated_{outcome}") == before + 1


def test_a_candidate_goes_live_once_it_is_canary_min_rounds_past_current_or_waited(tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    clock = Clock()
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        controller = CanaryController(CanaryConfig(canary_min_rounds=3, canary_queue_timeout_seconds=60),
                                      CanaryTestConfig(), registry, store, clock)
        stable = publish(registry)
        registry.activate(stable)
        first = publish(registry, parent=stable)
        controller.queue(first)
        clock.now += 59
        second = publish(registry, parent=first)
        controller.queue(second)
        clock.now += 2  # the first has waited 61 s, but the newest 2 s: the wait is the newest's
        assert controller.step() is None and registry.canary() == ""  # two rounds past CURRENT: both wait
        assert registry.decision(first)["outcome"] == registry.decision(second)["outcome"] == "queued"
        assert head(registry) == second  # training goes on from the newest meanwhile
        third = publish(registry, parent=second)
        controller.queue(third)
        controller.step()
        assert registry.canary() == third and registry.decision(third)["stable"] == stable
        assert registry.decision(first)["outcome"] == registry.decision(second)["outcome"] == "superseded"

        # Promoted, the count starts again from the new CURRENT; a lone candidate goes live after the timeout.
        registry.promote()
        controller.step()
        fourth = publish(registry, parent=third)
        controller.queue(fourth)
        clock.now += 59
        assert controller.step() is None and registry.canary() == ""
        clock.now += 1
        controller.step()
        assert registry.canary() == fourth and registry.decision(fourth)["stable"] == third


def test_the_line_of_a_replaced_canary_goes_on_whatever_its_count(tmp_path):
    """A canary live after the timeout (1 round past CURRENT) and superseded undecided: the candidate trained
    from it replaces it at once, though only 2 rounds past CURRENT of the 3 asked for."""
    registry = AdapterRegistry(tmp_path / "adapters")
    clock = Clock()
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        controller = CanaryController(CanaryConfig(canary_min_rounds=3, canary_queue_timeout_seconds=60,
                                                   canary_replace_after=30), CanaryTestConfig(), registry, store,
                                      clock)
        stable = publish(registry)
        registry.activate(stable)
        first = publish(registry, parent=stable)
        controller.queue(first)
        clock.now += 60
        controller.step()
        assert registry.canary() == first
        later = publish(registry, parent=first)
        controller.queue(later)
        rate(store, clock, stable, "u", 140, 60, "s")
        rate(store, clock, first, "u", 21, 9, "a")  # 30 judged, 70% vs 70%: undecided, leaning to not better
        record = controller.step()
        assert record["outcome"] == "superseded" and registry.canary() == later


def test_canary_min_rounds_and_queue_timeout_out_of_range_are_refused_naming_the_field():
    from rlhf_online.errors import ConfigError

    with pytest.raises(ConfigError, match="canary_min_rounds: invalid value 0"):
        CanaryConfig(canary_min_rounds=0)
    with pytest.raises(ConfigError, match="canary_queue_timeout_seconds: invalid value 0"):
        CanaryConfig(canary_queue_timeout_seconds=0)
