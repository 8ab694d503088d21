"""Errors that show nothing internal: when the store, the registry or the configuration fails under an RPC (or an
HTTP request), the caller gets a status code and a message naming the version or the setting, never a path, SQL
or a stack trace, and the server's log has the full detail.

The table-driven cases of test_bad_input.py check every RPC's validation errors the same way (kit.leaks).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import urllib.error
import urllib.request

import grpc
import psycopg
import pytest

from rlhf_online.errors import ConfigError
from rlhf_online.v1 import generation_pb2 as pb
from rlhf_online.v1 import reward_pb2 as rw
from rlhf_online.v1 import trainer_pb2 as tr

P = pb.SamplingParams(max_new_tokens=2, temperature=0.0)


def break_store(url: str) -> None:
    """Rename every table of the store's database behind its back: each query then fails inside the driver."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as con:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for t in tables:
                if not t.startswith("sqlite_"):
                    con.execute(f'ALTER TABLE "{t}" RENAME TO "{t}_gone"')
        return
    with psycopg.connect(url, autocommit=True) as con:
        for (t,) in con.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()").fetchall():
            con.execute(f'ALTER TABLE "{t}" RENAME TO "{t}_gone"')


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    """A store URL of each backend, empty."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        yield request.getfixturevalue("pg_url")


def fails_safely(call, kit, caplog) -> tuple[grpc.StatusCode, str]:
    """Run a call that must fail: its message shows nothing internal, and the log has the error's detail."""
    caplog.clear()
    got, details = kit.code(call)
    assert got != grpc.StatusCode.OK and details, "the call did not fail"
    assert not kit.leaks(details), f"{got.name}: the message shows {kit.leaks(details)}: {details!r}"
    logged_detail(caplog)
    return got, details


def logged_detail(caplog) -> None:
    """Some ERROR record of the failure carries more than the client was told: its exception or its full error."""
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(r.exc_info or getattr(r, "error", "") for r in errors), [r.getMessage() for r in errors]


# ------------------------------------------------------------------------------------------------ the store

def test_a_failing_store_under_generation_rpcs_and_http(tiny, tmp_path, kit, caplog, store_url):
    g = kit.start_generation(tiny, tmp_path / "gen", store_url=store_url, http_port=0)
    try:
        ids = [c.completion_id for c in g.stub.Generate(pb.GenerateRequest(prompt="Hi.", n=2, params=P),
                                                         timeout=30).completions]
        break_store(store_url)
        calls = {
            "Generate": lambda: g.stub.Generate(pb.GenerateRequest(prompt="Hi again.", params=P), timeout=30),
            "GenerateStream": lambda: list(g.stub.GenerateStream(pb.GenerateRequest(prompt="Hi.", params=P),
                                                                 timeout=30)),
            "SubmitFeedback": lambda: g.stub.SubmitFeedback(pb.SubmitFeedbackRequest(
                completion_id=ids[0], rating=pb.RATING_THUMBS_UP), timeout=10),
            "SubmitPreference": lambda: g.stub.SubmitPreference(pb.SubmitPreferenceRequest(
                chosen_completion_id=ids[0], rejected_completion_id=ids[1]), timeout=10),
            "SubmitRanking": lambda: g.stub.SubmitRanking(pb.SubmitRankingRequest(completion_ids=ids), timeout=10),
        }
        for method, call in calls.items():
            got, details = fails_safely(call, kit, caplog)
            assert got in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE), (method, got, details)
        url = f"http://127.0.0.1:{g.running.http_port}"
        for path, body in (("/feedback", {"completion_id": ids[0], "rating": "thumbs_up"}),
                           ("/generate", {"inputs": "Hi.", "parameters": {"max_new_tokens": 2}})):
            status, text = post(url + path, body)
            assert status == 500 and not kit.leaks(text), (path, status, text)
        assert g.stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).base_model == "tiny"  # the server lives on
    finally:
        g.running.shutdown(1)


def test_a_failing_store_under_reward_and_trainer_rpcs(tiny, tmp_path, kit, caplog, store_url):
    rstub, _, reward = kit.start_reward(tmp_path / "reward", store_url=store_url)
    tstub, _, trainer = kit.start_trainer(tiny, tmp_path / "trainer", store_url=store_url, prompts=8)
    try:
        break_store(store_url)
        # An item with a completion id is scored from its users' ratings: the store is asked.
        fails_safely(lambda: rstub.Score(rw.ScoreRequest(items=[rw.ScoreItem(prompt="p", completion="c",
                                                                             completion_id="c0")]), timeout=10),
                     kit, caplog)
        fails_safely(lambda: tstub.GetStatus(tr.GetStatusRequest(), timeout=10), kit, caplog)
        caplog.clear()
        r = tstub.RunRound(tr.RunRoundRequest(), timeout=120)
        assert r.outcome == "rejected" and r.reason.startswith("round failed: ") and not kit.leaks(r.reason), r
        logged_detail(caplog)
    finally:
        trainer.shutdown(1)
        reward.shutdown(1)


# ------------------------------------------------------------------------------------------------ the registry

def test_a_version_with_an_unreadable_manifest(tiny, tmp_path, kit, caplog, lora_dirs):
    stub, registry, running = kit.start_trainer(tiny, tmp_path)
    try:
        good = registry.publish(kit.copy_into(lora_dirs["good0"]), base_model="tiny")
        broken = registry.publish(kit.copy_into(lora_dirs["good1"]), base_model="tiny")
        registry.activate(good)
        (registry.path(broken) / "manifest.json").write_text("{not json")
        got, details = fails_safely(lambda: stub.ActivatePolicy(tr.ActivatePolicyRequest(version=broken), timeout=10),
                                    kit, caplog)
        assert (got, details) == (grpc.StatusCode.INVALID_ARGUMENT, f"version: {broken} is corrupt: its manifest is "
                                                                    "unreadable")
        fails_safely(lambda: stub.ListPolicies(tr.ListPoliciesRequest(), timeout=10), kit, caplog)
        assert stub.GetStatus(tr.GetStatusRequest(), timeout=10).current == good == registry.current()
    finally:
        running.shutdown(1)


def test_a_round_on_a_damaged_current_version_names_no_file(tiny, tmp_path, kit, caplog, lora_dirs):
    stub, registry, running = kit.start_trainer(tiny, tmp_path, prompts=8)
    try:
        version = registry.publish(kit.copy_into(lora_dirs["good0"]), base_model="tiny")
        registry.activate(version)
        (registry.path(version) / "adapter_config.json").unlink()  # PEFT's error names the directory
        caplog.clear()
        r = stub.RunRound(tr.RunRoundRequest(), timeout=120)
        assert r.outcome == "rejected" and r.reason.startswith("round failed: ") and not kit.leaks(r.reason), r
        assert stub.GetStatus(tr.GetStatusRequest(), timeout=10).last_round.reason == r.reason
        assert any(r.exc_info and str(tmp_path) in str(r.exc_info[1]) for r in caplog.records)  # the log names it
    finally:
        running.shutdown(1)


# ------------------------------------------------------------------------------------------------ configuration

def test_a_configuration_error_under_an_rpc_names_the_setting_only(tmp_path, kit, caplog, monkeypatch):
    stub, runtime, running = kit.start_reward(tmp_path)
    head = tmp_path / "reward_models" / "r000001"

    def misconfigured():
        raise ConfigError(f"encoder_layer: the reward head {head} was trained on encoder layer 2, not 3")

    monkeypatch.setattr(runtime, "train", misconfigured)
    try:
        caplog.clear()
        got, details = kit.code(lambda: stub.Train(rw.TrainRewardRequest(), timeout=10))
        assert got == grpc.StatusCode.FAILED_PRECONDITION and details.startswith("encoder_layer: "), details
        assert not kit.leaks(details) and "r000001" not in details
        assert any(str(head) in getattr(r, "error", "") for r in caplog.records)  # the operator's detail: logged
    finally:
        running.shutdown(1)


def test_a_configuration_error_under_http_names_the_setting_only(tiny, tmp_path, kit, monkeypatch):
    g = kit.start_generation(tiny, tmp_path, http_port=0)
    try:
        cid = g.stub.Generate(pb.GenerateRequest(prompt="Hi.", params=P), timeout=30).completions[0].completion_id

        def misconfigured(*args, **kwargs):
            raise ConfigError(f"store_url: cannot write to {tmp_path / 'store.db'}")

        monkeypatch.setattr(g.store, "add_feedback", misconfigured)
        status, text = post(f"http://127.0.0.1:{g.running.http_port}/feedback",
                            {"completion_id": cid, "rating": "thumbs_up"})
        assert status == 500 and json.loads(text)["error"].startswith("store_url: ") and not kit.leaks(text), text
    finally:
        g.running.shutdown(1)


def post(url: str, body: dict) -> tuple[int, str]:
    """(status, body text) of a JSON POST."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
