"""Simulated users against a real Generation service (tiny model, port 0): requests, ratings, preferences."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from support import wait_for

from rlhf_online.config import GenerationSettings
from rlhf_online.errors import ConfigError
from rlhf_online.simulate.judges import Persona
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
    assert s.by_version[""][1] == s.completions  # each candidate counted for its own version: the bare base
    # Every reply served also got the persona's noise-free verdict, counted per version.
    assert s.served_by_version[""][1] == s.completions and 0 <= s.served_by_version[""][0] <= s.completions
    assert sum(r["noise_free_thumbs_up"] for r in rows) == s.served_by_version[""][0]


def test_users_rate_only_a_share_of_replies_and_score_each_reply_once(generation, tmp_path, monkeypatch):
    addr, store = generation
    calls = []
    score = Persona.preference

    def counted(self, texts):
        calls.append(len(texts))
        return score(self, texts)

    monkeypatch.setattr(Persona, "preference", counted)
    events = tmp_path / "events.jsonl"
    # One user and a fixed seed: its dice are the same every run, whatever the timing; 40 pairs = 80 replies.
    cfg = UserPoolConfig(users=1, pair_fraction=1.0, rated_fraction=0.5, max_new_tokens=6, seed=3)
    pool = UserPool(addr, ["Reply to my rude neighbour.", "Review the cafe."], cfg, events).start()
    wait_for(lambda: pool.stats.requests >= 40, 120, "40 answered requests")
    pool.stop()
    s = pool.stats
    assert not s.errors and s.completions == 2 * s.requests
    # About half the replies rated and half the pairs' preferences sent (Binomial(>=80, 0.5): 0.25..0.75 is > 4 SD).
    assert 0.25 * s.completions < s.ratings < 0.75 * s.completions
    assert 0.25 * s.requests < s.preferences < 0.75 * s.requests
    assert store.count_feedback() == s.ratings and store.count_preferences() == s.preferences
    assert s.by_version[""] == [s.thumbs_up, s.ratings]
    # The noise-free verdict covers every reply, rated or not.
    assert s.served_by_version[""][1] == s.completions
    rows = [json.loads(line) for line in events.read_text().splitlines()]
    assert sum(r["ratings"] for r in rows) == s.ratings and sum(r["preference"] for r in rows) == s.preferences
    # The judges scored each request's replies once: ratings, preference and noise-free verdicts share the scores.
    assert calls == [2] * s.requests


def test_users_with_rank_n_rank_all_candidates_of_a_request_instead_of_preferring(generation, tmp_path):
    addr, store = generation
    events = tmp_path / "events.jsonl"
    cfg = UserPoolConfig(users=2, pair_fraction=0.5, rank_n=4, max_new_tokens=6, seed=2)
    pool = UserPool(addr, ["Reply to my rude neighbour.", "Review the cafe."], cfg, events).start()
    wait_for(lambda: pool.stats.requests >= 12 and pool.stats.rankings >= 3, 120, "12 requests, 3 of them ranked")
    pool.stop()
    s = pool.stats
    assert not s.errors and s.preferences == store.count_preferences() == 0
    assert store.count_rankings() == s.rankings and store.count_feedback() == s.completions  # thumbs as before
    # A request's candidates share its user and its sampling seed: each ranking orders exactly those of one n=4 request.
    requests: dict[tuple[str, int], set[str]] = {}
    for c in store.list_completions():
        requests.setdefault((c.user_id, c.params["seed"]), set()).add(c.completion_id)
    assert sorted(map(len, requests.values())) == sorted([1] * (s.requests - s.rankings) + [4] * s.rankings)
    rankings = store.list_rankings()
    assert all(len(r.completion_ids) == 4 and set(r.completion_ids) in requests.values() for r in rankings)
    assert len({frozenset(r.completion_ids) for r in rankings}) == s.rankings  # one ranking per request
    rows = [json.loads(line) for line in events.read_text().splitlines()]
    assert sum(r["ranking"] for r in rows) == s.rankings and not any(r["preference"] for r in rows)
    assert all(r["completions"] == (4 if r["ranking"] else 1) for r in rows)


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
                                        ({"pair_fraction": 1.5}, "pair_fraction"), ({"noise": 0.9}, "noise"),
                                        ({"rated_fraction": 0.0}, "rated_fraction"),
                                        ({"rated_fraction": 1.01}, "rated_fraction"),
                                        ({"rated_fraction": -0.5}, "rated_fraction"),
                                        ({"rank_n": 1}, "rank_n"), ({"rank_n": 9}, "rank_n"),
                                        ({"rank_n": -2}, "rank_n")])
def test_bad_pool_settings_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        UserPoolConfig(**bad)


def test_each_candidate_counts_for_the_version_that_wrote_it(generation, tmp_path):
    """Under a canary a request's two candidates come from two versions: each is counted for its own."""
    pool = UserPool(generation[0], ["hi"], UserPoolConfig(users=1), tmp_path / "events.jsonl")
    pool._count("polite-0", "v2", [("v2", True, True), ("", False, False)], preferred=True)  # stable: the bare base
    pool._count("positive-1", "", [("", None, True)], preferred=False)
    pool.stop()
    s = pool.stats
    assert (s.requests, s.completions, s.thumbs_up, s.thumbs_down, s.preferences) == (2, 3, 1, 1, 1)
    assert s.by_version == {"v2": [1, 1], "": [0, 1]}  # the unrated reply counts as served, not as rated
    assert s.served_by_version == {"v2": [1, 1], "": [1, 2]}
    assert s.served_by_version_user == {"v2": {"polite-0": [1, 1]}, "": {"polite-0": [0, 1], "positive-1": [1, 1]}}
    rows = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert rows[0]["versions"] == ["v2", ""] and rows[0]["policy_version"] == "v2"


def test_an_interleaved_reply_of_the_bare_base_counts_for_the_base_not_the_canary(tmp_path):
    """The stable side may be the bare base (""): its candidate is the base's, whatever the response names."""
    import random

    from rlhf_online.simulate.judges import PERSONAS
    from rlhf_online.v1 import generation_pb2 as pb

    class Stub:  # the server's answer to a user in the canary share, asking for n=2
        def Generate(self, request, timeout):
            return pb.GenerateResponse(policy_version="v000001", completions=[
                pb.Completion(completion_id="a", text="Thank you, that is lovely!", policy_version="v000001"),
                pb.Completion(completion_id="b", text="Whatever.", policy_version="")])

        def SubmitFeedback(self, request, timeout):
            return pb.SubmitFeedbackResponse()

        def SubmitPreference(self, request, timeout):
            return pb.SubmitPreferenceResponse()

    pool = UserPool("127.0.0.1:9", ["hi"], UserPoolConfig(users=1, pair_fraction=1.0))
    pool.stub = Stub()
    pool._one_request("polite-0", PERSONAS["polite"], random.Random(0))
    pool.stop()
    assert pool.stats.served_by_version["v000001"][1] == 1 and pool.stats.served_by_version[""][1] == 1
    assert pool.stats.by_version["v000001"][1] == 1 and pool.stats.by_version[""][1] == 1
