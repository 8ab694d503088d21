"""--require-api-key end to end: who may generate, who may rate what, rate limits; gRPC and HTTP."""

from __future__ import annotations

import grpc
import pytest
from support import post, sample

from rlhf_online.auth.keys import create_key
from rlhf_online.config import GenerationSettings
from rlhf_online.store import open_store
from rlhf_online.v1 import generation_pb2 as pb
from rlhf_online.v1 import generation_pb2_grpc as pb_grpc
from services.bootstrap import engine_config
from services.generation import start_generation_server

PARAMS = pb.SamplingParams(max_new_tokens=4, temperature=0.0)


@pytest.fixture
def keyed(make_engine, tmp_path):
    """A generation server with keys required (and HTTP); returns (stub, store, http url, keys by name)."""
    servers = []

    def start(**overrides):
        settings = GenerationSettings(port=0, metrics_port=0, http_port=0, host="127.0.0.1", data_dir=tmp_path,
                                      store_url=f"sqlite:///{tmp_path / 'store.db'}", grace_seconds=2,
                                      require_api_key=True, **overrides)
        cfg = engine_config(settings)
        store = open_store(settings.store_url)
        keys = {"acme": create_key(store, "acme")[1], "globex": create_key(store, "globex")[1],
                "labeller": create_key(store, "lab", "annotator")[1]}
        engine = make_engine(max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue, limits=cfg.limits)
        running = start_generation_server(settings, engine, store)
        servers.append(running)
        stub = pb_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
        return stub, store, f"http://127.0.0.1:{running.http_port}", keys

    yield start
    for s in servers:
        s.shutdown(1)


def with_key(key: str) -> list[tuple[str, str]]:
    return [("x-api-key", key)]


def status(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_calls_without_a_valid_key_are_unauthenticated(keyed):
    stub, store, _, keys = keyed()
    request = pb.GenerateRequest(prompt="Hi", params=PARAMS, user_id="alice")
    before = sample("rlhf_grpc_requests_total", service="Generation", method="Generate", code="UNAUTHENTICATED")
    for metadata in (None, with_key("rlhf_nope"), with_key(keys["acme"][:-2] + "00")):
        assert status(lambda md=metadata: stub.Generate(request, metadata=md, timeout=30)) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert status(lambda md=metadata: list(stub.GenerateStream(request, metadata=md, timeout=30))) == \
            grpc.StatusCode.UNAUTHENTICATED
    assert sample("rlhf_grpc_requests_total", service="Generation", method="Generate",
                  code="UNAUTHENTICATED") - before == 3
    assert store.count_completions() == 0
    assert stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).base_model  # tells only versions: open
    r = stub.Generate(request, metadata=with_key(keys["acme"]), timeout=30)
    assert store.get_completion(r.completions[0].completion_id).tenant == "acme"
    chunks = list(stub.GenerateStream(request, metadata=with_key(keys["acme"]), timeout=30))
    assert store.get_completion(chunks[-1].completion_id).user_id == "alice"


def test_only_the_user_served_or_an_annotator_may_rate(keyed):
    stub, store, _, keys = keyed()
    acme = with_key(keys["acme"])
    r = stub.Generate(pb.GenerateRequest(prompt="Hi", n=2, params=PARAMS, user_id="alice"), metadata=acme, timeout=30)
    a, b = (c.completion_id for c in r.completions)
    up = pb.RATING_THUMBS_UP
    denied = [
        (lambda: stub.SubmitFeedback(pb.SubmitFeedbackRequest(completion_id=a, rating=up, user_id="bob"),
                                     metadata=acme, timeout=10)),  # same tenant, another user
        (lambda: stub.SubmitFeedback(pb.SubmitFeedbackRequest(completion_id=a, rating=up, user_id="alice"),
                                     metadata=with_key(keys["globex"]), timeout=10)),  # another tenant's alice
        (lambda: stub.SubmitPreference(pb.SubmitPreferenceRequest(chosen_completion_id=a, rejected_completion_id=b,
                                                                  user_id="mallory"), metadata=acme, timeout=10)),
        (lambda: stub.SubmitRanking(pb.SubmitRankingRequest(completion_ids=[b, a], user_id="mallory"),
                                    metadata=acme, timeout=10)),
    ]
    for call in denied:
        assert status(call) == grpc.StatusCode.PERMISSION_DENIED
    assert (store.count_feedback(), store.count_preferences(), store.count_rankings()) == (0, 0, 0)
    assert status(lambda: stub.SubmitFeedback(pb.SubmitFeedbackRequest(completion_id=a, rating=up, user_id="alice"),
                                              timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    stub.SubmitFeedback(pb.SubmitFeedbackRequest(completion_id=a, rating=up, user_id="alice"), metadata=acme,
                        timeout=10)
    stub.SubmitRanking(pb.SubmitRankingRequest(completion_ids=[b, a], user_id="alice"), metadata=acme, timeout=10)
    stub.SubmitFeedback(pb.SubmitFeedbackRequest(completion_id=b, rating=up, user_id="lab-7"),
                        metadata=with_key(keys["labeller"]), timeout=10)
    rows = {f.user_id: (f.tenant, f.rater_role) for f in store.list_feedback()}
    assert rows == {"alice": ("acme", "user"), "lab-7": ("lab", "annotator")}  # the annotator recorded as such
    assert store.list_rankings()[0].rater_role == "user"


def test_a_user_over_the_feedback_rate_is_refused_and_the_others_are_not(keyed):
    stub, store, _, keys = keyed(feedback_rate_per_user=0.001, feedback_burst_per_user=2)
    acme = with_key(keys["acme"])
    ids = {}
    for user in ("alice", "bob"):
        r = stub.Generate(pb.GenerateRequest(prompt="Hi", n=3, params=PARAMS, user_id=user), metadata=acme,
                          timeout=30)
        ids[user] = [c.completion_id for c in r.completions]
    refused = sample("rlhf_feedback_refused_total", reason="user_rate_limit")

    def rate(user: str, k: int) -> grpc.StatusCode:
        return status(lambda: stub.SubmitFeedback(pb.SubmitFeedbackRequest(
            completion_id=ids[user][k], rating=pb.RATING_THUMBS_DOWN, user_id=user), metadata=acme, timeout=10))

    assert [rate("alice", k) for k in range(3)] == [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert [rate("bob", k) for k in range(2)] == [grpc.StatusCode.OK] * 2  # bob's own budget
    assert sample("rlhf_feedback_refused_total", reason="user_rate_limit") - refused == 1
    assert store.count_feedback() == 4


def test_http_takes_the_key_from_the_header(keyed):
    _, store, url, keys = keyed()
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3, "user_id": "alice"}}
    code, _, err = post(f"{url}/generate", body)
    assert code == 401 and err["error_type"] == "unauthenticated" and "x-api-key" in err["error"]
    code, headers, _ = post(f"{url}/generate", body, {"x-api-key": keys["acme"]})
    assert code == 200
    cid = headers["X-Completion-Id"]
    fb = {"completion_id": cid, "rating": "thumbs_up", "user_id": "bob"}
    assert post(f"{url}/feedback", fb, {"x-api-key": keys["acme"]})[0] == 403
    assert post(f"{url}/feedback", {**fb, "user_id": "alice"})[0] == 401
    assert post(f"{url}/feedback", {**fb, "user_id": "alice"}, {"x-api-key": keys["acme"]})[2] == {"duplicate": False}
    assert [(f.user_id, f.tenant) for f in store.list_feedback()] == [("alice", "acme")]
