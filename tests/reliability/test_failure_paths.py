"""Failure paths of a serving replica: what a client sees when a part fails mid-flight, that the server lives
on, and that nothing acknowledged is lost."""

from __future__ import annotations

import http.client
import json
import sqlite3
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf_online.v1 import generation_pb2 as pb

SECRET = "/opt/secret/kernels/attention.cu"  # a path that must never reach a client
LONG = pb.SamplingParams(max_new_tokens=400, temperature=1.0)
SHORT = pb.SamplingParams(max_new_tokens=4, temperature=0.0)


class ForwardFault:
    """Makes the model's forward pass raise while armed (the way a CUDA or kernel error would surface)."""

    def __init__(self, model) -> None:
        self.armed = threading.Event()
        forward = model.forward

        def faulty(*args, **kwargs):
            if self.armed.is_set():
                raise RuntimeError(f"illegal memory access in {SECRET}")
            return forward(*args, **kwargs)

        model.forward = faulty


def serving(g) -> int:
    """The replica's gRPC health status."""
    return health_pb2_grpc.HealthStub(g.channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_a_forward_pass_failing_mid_batch_fails_its_requests_and_the_server_lives_on(generation, kit):
    g = generation(step_delay=0.01)
    fault = ForwardFault(g.engine.model)
    failed = kit.sample("rlhf_generation_requests_total", outcome="failed")
    streams = [g.stub.GenerateStream(pb.GenerateRequest(prompt=f"Tell me a story {i}.", params=LONG), timeout=60)
               for i in range(2)]
    for s in streams:
        next(s)  # each is decoding: 400 tokens at >= 10 ms a step leave plenty in flight
    fault.armed.set()
    for s in streams:
        code, details = kit.code(lambda s=s: list(s))
        assert code == grpc.StatusCode.INTERNAL, (code, details)
        assert "generation failed on the server" in details and SECRET not in details and "memory" not in details
    assert kit.sample("rlhf_generation_requests_total", outcome="failed") == failed + 2
    fault.armed.clear()
    kit.wait_for(lambda: g.engine.busy == 0, 30, "the failed rows to leave the batch")
    assert g.store.count_completions() == 0  # a failed generation hands out no ids and logs nothing
    r = g.stub.Generate(pb.GenerateRequest(prompt="Still there?", params=SHORT), timeout=30)
    assert r.completions[0].completion_tokens == 4 and g.store.get_completion(r.completions[0].completion_id)
    assert serving(g) == health_pb2.HealthCheckResponse.SERVING


def test_an_unexpected_error_in_a_servicer_is_internal_without_details_and_records_nothing(generation, kit,
                                                                                          monkeypatch):
    g = generation()
    r = g.stub.Generate(pb.GenerateRequest(prompt="Hello", params=SHORT), timeout=30)
    cid = r.completions[0].completion_id
    real = g.store.add_feedback

    def broken(*args, **kwargs):
        raise KeyError(f"bucket {SECRET}")

    monkeypatch.setattr(g.store, "add_feedback", broken)
    internal = kit.rpcs("Generation", "SubmitFeedback", "INTERNAL")
    feedback = pb.SubmitFeedbackRequest(completion_id=cid, rating=pb.RATING_THUMBS_UP, user_id="u1")
    code, details = kit.code(lambda: g.stub.SubmitFeedback(feedback, timeout=10))
    assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error: KeyError")
    assert kit.rpcs("Generation", "SubmitFeedback", "INTERNAL") == internal + 1
    monkeypatch.setattr(g.store, "add_feedback", real)
    # Not acknowledged, so not recorded: the client's retry is the first time the store sees it.
    assert g.stub.SubmitFeedback(feedback, timeout=10).duplicate is False
    assert [f.completion_id for f in g.store.list_feedback()] == [cid]


@pytest.mark.parametrize("stream", [False, True], ids=["Generate", "GenerateStream"])
def test_a_store_failing_to_log_a_finished_generation_hands_out_no_ids(stream, generation, kit, monkeypatch):
    g = generation()
    real = g.store.add_completions
    calls = []

    def disk_full(records):
        calls.append(len(records))
        raise sqlite3.OperationalError(f"database or disk is full: {SECRET}")

    monkeypatch.setattr(g.store, "add_completions", disk_full)
    request = pb.GenerateRequest(prompt="Hello", params=SHORT, n=2)
    if stream:
        got = []

        def call():
            for m in g.stub.GenerateStream(request, timeout=30):
                got.append(m)
    else:
        def call():
            g.stub.Generate(request, timeout=30)
    code, details = kit.code(call)
    assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error: OperationalError") and calls == [2]
    if stream:  # the deltas before the end came, but no candidate's last message: the stream never finished
        assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in got)
    monkeypatch.setattr(g.store, "add_completions", real)
    kit.wait_for(lambda: g.engine.busy == 0, 30, "the engine to be idle")
    r = g.stub.Generate(pb.GenerateRequest(prompt="Hello", params=SHORT), timeout=30)
    assert g.store.count_completions() == 1 and g.store.get_completion(r.completions[0].completion_id)


def sse_connection(g, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """POST /generate_stream; returns the open connection and its response, headers read."""
    conn = http.client.HTTPConnection("127.0.0.1", g.running.http_port, timeout=60)
    conn.request("POST", "/generate_stream", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def next_event(resp: http.client.HTTPResponse) -> dict:
    """The next server-sent event's JSON payload."""
    while True:
        line = resp.readline()
        assert line, "the stream ended"
        if line.startswith(b"data:"):
            return json.loads(line[5:])


def test_an_http_client_that_goes_away_cancels_its_generation(generation, kit):
    g = generation(step_delay=0.05, http_port=0)
    cancelled = kit.sample("rlhf_generation_requests_total", outcome="cancelled")
    conn, resp = sse_connection(g, {"inputs": "Tell me a long story.", "parameters": {"max_new_tokens": 400}})
    assert next_event(resp)["token"]["id"] >= 0  # decoding: 400 tokens at >= 50 ms a step, 20 s at least
    conn.sock.shutdown(2)
    conn.close()
    kit.wait_for(lambda: kit.sample("rlhf_generation_requests_total", outcome="cancelled") == cancelled + 1, 30,
                 "the abandoned request to be cancelled")
    kit.wait_for(lambda: g.engine.busy == 0, 30, "its batch slot to be freed")
    assert g.store.count_completions() == 0  # it never finished, so nothing was logged


def test_an_error_mid_stream_arrives_as_an_error_event_and_the_server_lives_on(generation, kit):
    g = generation(step_delay=0.01, http_port=0)
    fault = ForwardFault(g.engine.model)
    conn, resp = sse_connection(g, {"inputs": "Tell me a story.", "parameters": {"max_new_tokens": 400}})
    try:
        assert next_event(resp)["token"]["id"] >= 0
        fault.armed.set()
        while "error" not in (event := next_event(resp)):
            assert event["generated_text"] is None  # no end-of-generation event before the error
        assert event["error_type"] == "generation" and "generation failed on the server" in event["error"]
        assert SECRET not in event["error"]
        assert resp.read().strip() == b""  # then the stream ends
    finally:
        conn.close()
    fault.armed.clear()
    conn = http.client.HTTPConnection("127.0.0.1", g.running.http_port, timeout=60)
    conn.request("POST", "/generate", body=json.dumps({"inputs": "Hi", "parameters": {"max_new_tokens": 3}}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.headers["X-Generated-Tokens"] == "3"
    assert g.store.count_completions() == 1


# ------------------------------------------------------------------------------------- PostgreSQL restart

@pytest.fixture
def own_database():
    """A PostgreSQL database of this test's own (it is taken offline), dropped after: (name, url)."""
    import uuid

    import psycopg
    from support import PG_ADMIN

    name = f"rel_restart_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield name, PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def database_admin(name: str, *statements: str) -> None:
    """Run admin statements against the cluster (connections to `name` can be cut from here)."""
    import psycopg
    from support import PG_ADMIN

    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        for statement in statements:
            admin.execute(statement.format(name=name))


CUT = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"


def test_postgresql_restarting_under_a_serving_replica(tiny, tmp_path, own_database, kit):
    """Dropped connections are replaced unseen; while the database is down clients get UNAVAILABLE (retryable)
    and nothing is half-written; once it is back the replica serves again and every acknowledged rating is there."""
    import copy

    from rlhf_online.config import GenerationSettings
    from rlhf_online.engine.engine import Engine
    from rlhf_online.store.postgres import PostgresStore
    from rlhf_online.v1 import generation_pb2_grpc as pb_grpc
    from services.bootstrap import engine_config
    from services.generation import start_generation_server

    name, url = own_database
    settings = GenerationSettings(port=0, metrics_port=0, host="127.0.0.1", data_dir=tmp_path, base_model="tiny",
                                  store_url=url, grace_seconds=5)
    engine = Engine(copy.deepcopy(tiny[0]), tiny[1], engine_config(settings)).start()
    store = PostgresStore(url, connect_timeout=3)  # a request waits at most 3 s for a connection
    running = start_generation_server(settings, engine, store)
    stub = pb_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
    acked: list[str] = []

    def generate_and_rate(user: str) -> str:
        cid = stub.Generate(pb.GenerateRequest(prompt="Hello", params=SHORT), timeout=30).completions[0].completion_id
        stub.SubmitFeedback(pb.SubmitFeedbackRequest(completion_id=cid, rating=pb.RATING_THUMBS_UP, user_id=user),
                            timeout=30)
        acked.append(cid)
        return cid

    try:
        for i in range(3):
            generate_and_rate(f"u{i}")
        # Every connection of the pool dropped (a failover, a proxy restart): the next calls do not notice.
        database_admin(name, CUT)
        for i in range(3):
            generate_and_rate(f"after-drop-{i}")

        # The database goes down: connections cut, new ones refused.
        rated_later = stub.Generate(pb.GenerateRequest(prompt="Rate me later", params=SHORT),
                                    timeout=30).completions[0].completion_id
        database_admin(name, "ALTER DATABASE {name} ALLOW_CONNECTIONS false", CUT)
        late = pb.SubmitFeedbackRequest(completion_id=rated_later, rating=pb.RATING_THUMBS_DOWN, user_id="late")
        code, details = kit.code(lambda: stub.SubmitFeedback(late, timeout=30))
        assert code == grpc.StatusCode.UNAVAILABLE and "unreachable" in details and name not in details, details
        code, details = kit.code(lambda: stub.Generate(pb.GenerateRequest(prompt="Hi", params=SHORT), timeout=30))
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)

        # Back up: the client's retry goes through once the pool has reconnected, and counts once.
        database_admin(name, "ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        answers: list[grpc.StatusCode] = []

        def retry() -> bool:
            code, _ = kit.code(lambda: stub.SubmitFeedback(late, timeout=30))
            answers.append(code)
            return code == grpc.StatusCode.OK

        kit.wait_for(retry, 60, "the replica to reach the database again", interval=0.2)
        assert set(answers) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, answers
        generate_and_rate("back")
    finally:
        running.shutdown(1)

    with PostgresStore(url) as check:
        feedback = check.list_feedback()
        assert sorted(f.completion_id for f in feedback if f.user_id != "late") == sorted(acked)
        assert [f.completion_id for f in feedback if f.user_id == "late"] == [rated_later]  # once
        assert check.count_completions() == len(acked) + 1  # the Generate refused while down logged nothing


# ------------------------------------------------------------------------------------- the reward service down

def test_trainer_rounds_wait_while_the_reward_service_is_down_and_run_once_it_is_back(tiny, tmp_path, kit):
    from rlhf_online.launch import free_port
    from rlhf_online.v1 import trainer_pb2 as tr
    from services.trainer import reward_client, reward_readiness

    addr = f"127.0.0.1:{free_port()}"  # nothing listens there yet
    # Each call waits up to 5 s for the service to be reachable (production: 30 s, and 300 s for scores).
    stub, registry, running = kit.start_trainer(tiny, tmp_path / "trainer", prompts=8, reward=reward_client(addr, 30),
                                                reward_not_ready=reward_readiness(addr, timeout=5))
    try:
        r = stub.RunRound(tr.RunRoundRequest(), timeout=120)
        assert r.outcome == "skipped" and r.reason.startswith(f"the reward service at {addr} is unreachable: "), r
        assert registry.versions() == []
        # The reward service comes up on that address (the built-in sentiment reward: ready at once).
        _, _, reward_running = kit.start_reward(tmp_path / "reward", port=int(addr.rsplit(":", 1)[1]))
        try:
            r = stub.RunRound(tr.RunRoundRequest(), timeout=300)
            assert r.outcome in ("published", "rejected") and "unreachable" not in r.reason, r
            assert "round failed" not in r.reason and "eval/kl" in r.metrics  # a whole round ran and was gated
        finally:
            reward_running.shutdown(1)
        # It goes away in the middle of the trainer's life: the next round says so, the trainer lives on.
        r = stub.RunRound(tr.RunRoundRequest(), timeout=120)
        assert r.outcome == "skipped" and "unreachable" in r.reason, r
        status = stub.GetStatus(tr.GetStatusRequest(), timeout=10)
        assert status.rounds_total == 3 and not status.round_in_progress
    finally:
        running.shutdown(1)


def test_a_reward_service_failing_mid_round_rejects_the_round_with_its_reason(tiny, tmp_path, kit):
    from rlhf_online.launch import free_port
    from rlhf_online.v1 import trainer_pb2 as tr
    from services.trainer import reward_client

    addr = f"127.0.0.1:{free_port()}"  # readiness says yes (as it would just before the service died), scoring fails
    stub, registry, running = kit.start_trainer(tiny, tmp_path, prompts=8, reward=reward_client(addr, 3),
                                                reward_not_ready=lambda: "")
    try:
        r = stub.RunRound(tr.RunRoundRequest(), timeout=120)
        assert r.outcome == "rejected" and r.reason.startswith("round failed: Unavailable: the reward service at")
        assert "DEADLINE_EXCEEDED" in r.reason and "debug_error_string" not in r.reason, r.reason
        assert registry.versions() == [] and registry.current() == ""
    finally:
        running.shutdown(1)
