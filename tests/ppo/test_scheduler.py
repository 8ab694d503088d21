"""The round scheduler: when a background round is due, and that the service's loop runs it."""

from __future__ import annotations

import copy

import pytest

from rlhf_online.adapters.registry import AdapterRegistry
from rlhf_online.ppo.config import PPOConfig, TrainerConfig
from rlhf_online.ppo.trainer import Trainer
from rlhf_online.store import CompletionRecord, open_store


@pytest.fixture
def make_trainer(tiny, tmp_path):
    """Trainer(round knobs) on the tiny model over a store with one completion to rate."""
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    store.add_completions([CompletionRecord(completion_id=f"c{i}", prompt=f"Tell me about thing {i}.", messages=(),
                                            text="ok", policy_version="") for i in range(8)])

    def make(**knobs) -> Trainer:
        return Trainer(TrainerConfig(**knobs), PPOConfig(batch_size=4, response_length=4), store,
                       AdapterRegistry(tmp_path / "adapters"), lambda p, t, ids: [0.0] * len(t),
                       lambda: (copy.deepcopy(tiny[0]), tiny[1]), base_model="tiny")

    yield make, store
    store.close()


def rate(store, *ids: str) -> None:
    for cid in ids:
        store.add_feedback(cid, "u", "thumbs_up")


def test_due_on_new_feedback_counted_since_the_last_round(make_trainer):
    make, store = make_trainer
    t = make(round_min_feedback=3, round_interval_seconds=0)
    assert not t.due(last_round_at=0.0, now=1e9)  # no feedback yet, and no interval: however long ago
    rate(store, "c0", "c1")
    assert not t.due(0.0, now=1e9)
    rate(store, "c2")
    assert t.due(0.0, now=1e9)
    t.feedback_seq_at_last_round = t.newest_feedback_seq()  # what a round records as it starts
    assert not t.due(0.0, now=1e9)
    rate(store, "c3", "c4", "c5")
    assert t.due(0.0, now=1e9)


def test_due_when_the_interval_passed(make_trainer):
    make, store = make_trainer
    t = make(round_min_feedback=0, round_interval_seconds=60)
    rate(store, *(f"c{i}" for i in range(8)))  # feedback alone does not trigger it: that knob is off
    assert not t.due(last_round_at=1000.0, now=1059.9)
    assert t.due(last_round_at=1000.0, now=1060.0)


def test_never_due_with_both_triggers_off(make_trainer):
    make, store = make_trainer
    t = make(round_min_feedback=0, round_interval_seconds=0)
    rate(store, *(f"c{i}" for i in range(8)))
    assert not t.due(last_round_at=0.0, now=1e9)


def test_the_service_loop_runs_a_round_once_enough_feedback_arrived(make_trainer, tmp_path):
    from support import wait_for

    from rlhf_online.config import TrainerSettings, assemble
    from rlhf_online.mainthread import MainThreadRunner
    from services.trainer import start_trainer_server

    make, store = make_trainer
    t = make(round_min_feedback=2, round_interval_seconds=0, min_prompts=100)  # the round itself skips quickly
    settings = assemble(TrainerSettings, {"port": 0, "metrics_port": 0, "host": "127.0.0.1", "data_dir": tmp_path})
    running = start_trainer_server(settings, t, t.registry, MainThreadRunner())
    try:
        assert t.rounds_total == 0
        rate(store, "c0", "c1")
        wait_for(lambda: t.rounds_total == 1, 60, "the scheduler to run a round")  # it looks every 5 s
        assert t.last.outcome == "skipped" and "min_prompts" in t.last.reason
    finally:
        running.shutdown(1)
