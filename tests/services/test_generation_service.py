"""The Generation gRPC service in-process on port 0, called like a client would."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import admitted, wait_for

from rlhf_online.config import GenerationSettings
from rlhf_online.store import open_store
from rlhf_online.v1 import generation_pb2 as pb
from rlhf_online.v1 import generation_pb2_grpc as pb_grpc
from services.bootstrap import engine_config
from services.generation import start_generation_server

PARAMS = pb.SamplingParams(max_new_tokens=8, temperature=0.0)


@pytest.fixture
def served(make_engine, tmp_path):
    """Start a generation server; returns a factory taking settings overrides."""
    servers = []

    def start(step_delay: float = 0.0, **overrides):
        settings = GenerationSettings(port=0, metrics_port=0, host="127.0.0.1", data_dir=tmp_path,
                                      store_url=f"sqlite:///{tmp_path / 'store.db'}", grace_seconds=5, **overrides)
        cfg = engine_config(settings)  # the same engine config production derives from settings
        engine = make_engine(step_delay=step_delay, max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue,
                             limits=cfg.limits)
        store = open_store(settings.store_url)
        running = start_generation_server(settings, engine, store)
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        servers.append(running)
        return running, pb_grpc.GenerationStub(channel), store, channel

    yield start
    for s in servers:
        s.shutdown(1)


def code(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_generate_logs_the_completion_and_feedback_is_idempotent(served):
    running, stub, store, _ = served()
    r = stub.Generate(pb.GenerateRequest(prompt="Say something kind.", params=PARAMS, user_id="u1",
                                         metadata={"app": "test"}), timeout=30)
    [c] = r.completions
    assert c.completion_id and c.text and c.completion_tokens == 8
    assert c.finish_reason == pb.FINISH_REASON_LENGTH and r.prompt_tokens > 5 and r.policy_version == ""
    logged = store.get_completion(c.completion_id)
    assert (logged.text, logged.prompt, logged.user_id, logged.policy_version) == (c.text, "Say something kind.", "u1", "")
    assert logged.metadata == {"app": "test"} and logged.params["max_new_tokens"] == 8

    up = pb.SubmitFeedbackRequest(completion_id=c.completion_id, rating=pb.RATING_THUMBS_UP, user_id="u1")
    assert stub.SubmitFeedback(up, timeout=5).duplicate is False
    assert stub.SubmitFeedback(up, timeout=5).duplicate is True
    assert store.count_feedback() == 1


def test_chat_messages_and_n_candidates(served):
    _, stub, store, _ = served()
    r = stub.Generate(pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="Hi there")], n=2,
                                         params=pb.SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)),
                      timeout=30)
    a, b = r.completions
    assert a.completion_id != b.completion_id
    assert store.get_completion(a.completion_id).messages == (("user", "Hi there"),)
    assert stub.SubmitPreference(pb.SubmitPreferenceRequest(chosen_completion_id=a.completion_id,
                                                            rejected_completion_id=b.completion_id, user_id="u"),
                                 timeout=5).duplicate is False


def test_n_candidates_with_temperature_unset_are_sampled_and_ranked(served):
    _, stub, store, _ = served()
    r = stub.Generate(pb.GenerateRequest(prompt="Tell me a story.", n=4, params=pb.SamplingParams(max_new_tokens=8)),
                      timeout=30)
    texts = [c.text for c in r.completions]
    assert len(set(texts)) == 4, texts  # sampled at 1.0: four greedy candidates would be one text four times
    ids = [c.completion_id for c in r.completions]
    assert {store.get_completion(i).params["temperature"] for i in ids} == {1.0}
    one = stub.Generate(pb.GenerateRequest(prompt="Tell me a story.", params=pb.SamplingParams(max_new_tokens=8)),
                        timeout=30).completions[0]
    assert store.get_completion(one.completion_id).params["temperature"] == 0.0  # n = 1 stays greedy
    best_first = [ids[2], ids[0], ids[3], ids[1], one.completion_id]  # a reply of another request, same prompt
    assert stub.SubmitRanking(pb.SubmitRankingRequest(completion_ids=best_first, user_id="u1"),
                              timeout=5).duplicate is False
    assert stub.SubmitRanking(pb.SubmitRankingRequest(completion_ids=best_first, user_id="u1"),
                              timeout=5).duplicate is True
    [ranking] = store.list_rankings()
    assert ranking.completion_ids == tuple(best_first) and ranking.user_id == "u1"


def test_stream_yields_deltas_and_logs_before_the_last_message(served):
    _, stub, store, _ = served()
    chunks = list(stub.GenerateStream(pb.GenerateRequest(prompt="Count to five.", params=PARAMS), timeout=30))
    assert len(chunks) > 1
    last = chunks[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.completion_tokens == 8
    text = "".join(c.text_delta for c in chunks)
    assert store.get_completion(last.completion_id).text == text


@pytest.mark.parametrize("name,request_,want,field", [
    ("empty prompt", pb.GenerateRequest(prompt="", params=PARAMS), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("both", pb.GenerateRequest(prompt="x", messages=[pb.ChatMessage(role="user", content="y")]),
     grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("over limit", pb.GenerateRequest(prompt="word " * 3000, params=PARAMS), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("temperature", pb.GenerateRequest(prompt="x", params=pb.SamplingParams(temperature=-2)),
     grpc.StatusCode.INVALID_ARGUMENT, "params.temperature"),
    ("top_p", pb.GenerateRequest(prompt="x", params=pb.SamplingParams(top_p=3)), grpc.StatusCode.INVALID_ARGUMENT,
     "params.top_p"),
    ("n", pb.GenerateRequest(prompt="x", n=1000), grpc.StatusCode.INVALID_ARGUMENT, "n"),
    ("role", pb.GenerateRequest(messages=[pb.ChatMessage(role="robot", content="y")]),
     grpc.StatusCode.INVALID_ARGUMENT, "messages[0].role"),
])
def test_bad_generate_requests(served, name, request_, want, field):
    _, stub, _, _ = served()
    got, details = code(lambda: stub.Generate(request_, timeout=30))
    assert got == want and field in details, (name, details)
    got, details = code(lambda: list(stub.GenerateStream(request_, timeout=30)))
    assert got == want and field in details, (name, details)


def test_feedback_errors(served):
    _, stub, _, _ = served()
    c = stub.Generate(pb.GenerateRequest(prompt="hi", params=PARAMS), timeout=30).completions[0]
    cases = [
        (pb.SubmitFeedbackRequest(completion_id="no-such-id", rating=pb.RATING_THUMBS_UP), grpc.StatusCode.NOT_FOUND),
        (pb.SubmitFeedbackRequest(completion_id="", rating=pb.RATING_THUMBS_UP), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SubmitFeedbackRequest(completion_id=c.completion_id), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for req, want in cases:
        assert code(lambda req=req: stub.SubmitFeedback(req, timeout=5))[0] == want
    same = pb.SubmitPreferenceRequest(chosen_completion_id=c.completion_id, rejected_completion_id=c.completion_id)
    assert code(lambda: stub.SubmitPreference(same, timeout=5))[0] == grpc.StatusCode.INVALID_ARGUMENT
    unknown = pb.SubmitPreferenceRequest(chosen_completion_id=c.completion_id, rejected_completion_id="nope")
    assert code(lambda: stub.SubmitPreference(unknown, timeout=5))[0] == grpc.StatusCode.NOT_FOUND


def test_calls_without_a_deadline(served):
    _, stub, _, _ = served()
    assert stub.Generate(pb.GenerateRequest(prompt="hi", params=PARAMS)).completions[0].completion_tokens == 8
    chunks = list(stub.GenerateStream(pb.GenerateRequest(prompt="hi", params=PARAMS)))
    assert chunks[-1].completion_tokens == 8


def test_deadline_exceeded_and_the_server_keeps_serving(served):
    _, stub, _, _ = served(step_delay=0.01)
    long = pb.GenerateRequest(prompt="Go on forever.", params=pb.SamplingParams(max_new_tokens=500, temperature=1.0))
    assert code(lambda: stub.Generate(long, timeout=0.5))[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stub.Generate(pb.GenerateRequest(prompt="hi", params=PARAMS), timeout=30).completions[0].text


def test_queue_full_is_resource_exhausted(served, wait_queue_depth):
    running, stub, _, _ = served(step_delay=0.02, max_batch_size=1, max_queue=1, max_n=1)
    long = pb.GenerateRequest(prompt="Go on.", params=pb.SamplingParams(max_new_tokens=400, temperature=1.0))
    streams = [stub.GenerateStream(long, timeout=60)]
    next(streams[0])  # the first is running
    streams.append(stub.GenerateStream(long, timeout=60))  # the second waits in the queue
    wait_queue_depth(1)
    t0 = time.time()
    got, details = code(lambda: stub.Generate(long, timeout=30))
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in details
    assert time.time() - t0 < 2  # refused at once, not after waiting
    for s in streams:
        s.cancel()


def test_health_reflection_and_metrics(served):
    running, stub, _, channel = served()
    stub.Generate(pb.GenerateRequest(prompt="hi", params=PARAMS), timeout=30)
    code(lambda: stub.Generate(pb.GenerateRequest(prompt=""), timeout=5))
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="rlhf_online.v1.Generation")).status == 1
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    [resp] = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"rlhf_online.v1.Generation", "grpc.health.v1.Health"} <= names
    text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5).read().decode()
    for series in ['rlhf_grpc_requests_total{code="OK",method="Generate",service="Generation"}',
                   'rlhf_grpc_requests_total{code="INVALID_ARGUMENT",method="Generate",service="Generation"}',
                   "rlhf_grpc_request_duration_seconds_bucket", "rlhf_generation_time_to_first_token_seconds_count",
                   "rlhf_generation_tokens_total", "rlhf_generation_batch_size_bucket", "rlhf_generation_queue_depth",
                   "rlhf_policy_version"]:
        assert series in text, series


def test_graceful_shutdown_finishes_in_flight_and_refuses_new(served):
    running, stub, _, channel = served(step_delay=0.02)
    health = health_pb2_grpc.HealthStub(channel)
    result = {}

    def in_flight():
        result["r"] = stub.Generate(pb.GenerateRequest(prompt="Go on.", params=pb.SamplingParams(
            max_new_tokens=60, temperature=0.0)), timeout=60)

    t = threading.Thread(target=in_flight)
    t.start()
    wait_for(admitted(running), 30, "the request to start decoding")
    assert t.is_alive()  # 60 tokens at >= 20 ms a step: still decoding when the drain begins
    stopper = threading.Thread(target=running.shutdown, args=(30,))
    stopper.start()
    serving = health_pb2.HealthCheckResponse.NOT_SERVING
    wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == serving, 30,
             "health to turn NOT_SERVING")
    assert code(lambda: stub.Generate(pb.GenerateRequest(prompt="new", params=PARAMS), timeout=5))[0] == \
        grpc.StatusCode.UNAVAILABLE
    t.join(60)
    stopper.join(60)
    assert result["r"].completions[0].completion_tokens == 60
    assert code(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=2))[0] == grpc.StatusCode.UNAVAILABLE
