"""Simulated users against a real Generation service (tiny model, port 0): requests, ratings, preferences."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from rlhf_online.config import GenerationSettings
from rlhf_online.errors import ConfigError
from rlhf_online.simulate.users import UserPool, UserPoolConfig
from rlhf_online.store import open_store
from services.bootstrap import engine_config
from services.generation import start_generation_server


@pytest.fixture
def generation(make_engine, tmp_path):
    settings = GenerationSettings(port=0, metrics_port=0, host="127.0.0.1", data_dir=tmp_path,
                                  store_url=f"sqlite:///{tmp_path / 'store.db'}", grace_seconds=2)
    cfg = engine_config(settings)
    engine = make_engine(max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue, limits=cfg.limits)
    store = open_store(settings.store_url)
    running = start_generation_server(settings, engine, store)
    yield f"127.0.0.1:{running.port}", store
    running.shutdown(1)


def test_users_generate_rate_and_prefer_through_the_api(generation, tmp_path):
    addr, store = generation
    events = tmp_path / "events.jsonl"
    cfg = UserPoolConfig(users=3, pair_fraction=0.5, max_new_tokens=6, seed=1)
    pool = UserPool(addr, ["Reply to my rude neighbour.", "Review the cafe."], cfg, events).start()
    deadline = time.time() + 60
    while pool.stats.requests < 12 and time.time() < deadline:
        time.sleep(0.1)
    pool.stop()
    s = pool.stats
    assert s.requests >= 12 and not s.errors
    # Every candidate got exactly one thumbs from its user, every pair one preference; the store has them all.
    assert store.count_feedback() == s.completions == s.thumbs_up + s.thumbs_down
    assert store.count_preferences() == s.preferences > 0
    assert s.completions > s.requests  # some requests asked for n=2
    rows = [json.loads(line) for line in events.read_text().splitlines()]
    assert len(rows) == s.requests and {r["policy_version"] for r in rows} == {""}
    assert {r["user"].split("-")[0] for r in rows} == {"polite", "positive"}
    assert s.by_version[""][1] == s.completions


def test_a_failing_server_counts_errors_instead_of_crashing_the_users():
    cfg = UserPoolConfig(users=1, timeout_seconds=0.5)
    pool = UserPool("127.0.0.1:1", ["hello"], cfg).start()
    deadline = time.time() + 10
    while not pool.stats.errors and time.time() < deadline:
        time.sleep(0.05)
    pool.stop()
    assert set(pool.stats.errors) <= {grpc.StatusCode.UNAVAILABLE.name, grpc.StatusCode.DEADLINE_EXCEEDED.name}
    assert pool.stats.errors and pool.stats.requests == 0


@pytest.mark.parametrize("bad, field", [({"personas": ("grumpy",)}, "personas"), ({"users": 0}, "users"),
                                        ({"pair_fraction": 1.5}, "pair_fraction"), ({"noise": 0.9}, "noise")])
def test_bad_pool_settings_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        UserPoolConfig(**bad)
