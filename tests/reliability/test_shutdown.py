"""Graceful shutdown of a real `rlhf-online serve generation` process under load.

SIGTERM while clients generate and send feedback: health turns NOT_SERVING, requests in flight
finish, new ones are refused with UNAVAILABLE, the process exits 0, and every feedback the
server acknowledged is in the store.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf_online import launch
from rlhf_online.v1 import generation_pb2 as pb
from rlhf_online.v1 import generation_pb2_grpc as pb_grpc

CLIENTS = 4
NEW_TOKENS = 400  # the long requests; client 0 sends short ones, so feedback flows from the start
RACE_S = 2.0  # a call sent this shortly before SIGTERM may arrive after draining began (and be refused)


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_sigterm_under_load(tiny_model_dir, tmp_path):
    env = {"RLHF_BASE_MODEL": str(tiny_model_dir), "RLHF_DATA_DIR": str(tmp_path), "RLHF_GRACE_SECONDS": "30",
           "RLHF_MAX_NEW_TOKENS": str(NEW_TOKENS), "RLHF_TORCH_THREADS": "1", "RLHF_DTYPE": "float32"}
    with launch.running("generation", env, tmp_path, ready_timeout=120, stop_timeout=0) as service:
        metrics_port = service.serving_record()["metrics_port"]
        channel = grpc.insecure_channel(service.address)
        stub, health = pb_grpc.GenerationStub(channel), health_pb2_grpc.HealthStub(channel)
        def request(i: int) -> pb.GenerateRequest:
            return pb.GenerateRequest(prompt="Tell me a long story.", params=pb.SamplingParams(
                max_new_tokens=NEW_TOKENS if i else 16, temperature=1.0))

        calls: list[tuple[float, float, grpc.StatusCode, str]] = []  # (start, end, code, details)
        acked: list[tuple[str, str]] = []  # (completion_id, user_id) of acknowledged feedback
        lock = threading.Lock()

        def client(i: int) -> None:
            while True:
                t0 = time.monotonic()
                try:
                    r = stub.Generate(request(i), timeout=120)
                except grpc.RpcError as e:
                    with lock:
                        calls.append((t0, time.monotonic(), e.code(), e.details() or ""))
                    return
                with lock:
                    calls.append((t0, time.monotonic(), grpc.StatusCode.OK, ""))
                cid = r.completions[0].completion_id
                try:
                    stub.SubmitFeedback(pb.SubmitFeedbackRequest(completion_id=cid, rating=pb.RATING_THUMBS_UP,
                                                                 user_id=f"user{i}"), timeout=30)
                except grpc.RpcError:
                    continue  # not acknowledged: nothing to check
                with lock:
                    acked.append((cid, f"user{i}"))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        end = time.time() + 60
        while not (len(acked) >= 3 and metric(metrics_port, "rlhf_generation_running_rows") >= 2):
            assert time.time() < end, "the load never got going"
            time.sleep(0.05)

        sigterm = time.monotonic()
        service.terminate()
        statuses = []
        while True:
            try:
                statuses.append(health.Check(health_pb2.HealthCheckRequest(), timeout=2).status)
            except grpc.RpcError as e:
                statuses.append(e.code())
            if statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            assert time.monotonic() - sigterm < 10, statuses
            time.sleep(0.01)
        not_serving = time.monotonic()
        # Draining: a new request is refused, not queued behind the ones finishing.
        code = None
        try:
            stub.Generate(pb.GenerateRequest(prompt="new", params=pb.SamplingParams(max_new_tokens=4)), timeout=10)
        except grpc.RpcError as e:
            code = e.code()
        assert code == grpc.StatusCode.UNAVAILABLE
        for t in threads:
            t.join(90)
        assert service.stop(timeout=60) == 0, service.log_tail()
        exited = time.monotonic()

    # grpc cancels a call that reaches the server in the instant it stops listening, before any handler took it
    # (grpc/grpc#41785; a probe of a bare grpc server: 11 CANCELLED of ~17,000 calls racing 20 stops). Only a call
    # sent after health said NOT_SERVING can meet that instant (new work was refused before then): such a call
    # was never admitted, so nothing of it is lost. Any other CANCELLED call fails the checks below.
    stop_races = [c for c in calls if c[2] == grpc.StatusCode.CANCELLED and c[0] > not_serving]
    calls = [c for c in calls if c not in stop_races]
    in_flight = [c for c in calls if c[0] < sigterm < c[1]]
    # A call sent a moment before SIGTERM may reach the server only after draining began: refused at admission
    # (the engine's "retry on another replica"), never started, so nothing of it is lost. Seen on a loaded
    # machine: sent 1 ms before SIGTERM, refused 1 ms later. Every other call in flight must finish.
    raced = [c for c in in_flight if sigterm - c[0] < RACE_S and c[2] == grpc.StatusCode.UNAVAILABLE
             and "retry on another replica" in c[3]]
    admitted = [c for c in in_flight if c not in raced]
    assert admitted, "no request was in flight at SIGTERM"
    assert all(c[2] == grpc.StatusCode.OK for c in admitted), in_flight
    late = [c for c in calls if c[0] > not_serving]
    assert late, "no call was sent after health turned NOT_SERVING"
    assert [c for c in late if c[2] != grpc.StatusCode.UNAVAILABLE] == [], late
    assert all(c[2] in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE) for c in calls), calls
    assert exited - sigterm < 30

    from rlhf_online.store import open_store

    with open_store(f"sqlite:///{tmp_path / 'rlhf.db'}") as store:
        recorded = {(f.completion_id, f.user_id) for f in store.list_feedback()}
        assert set(acked) <= recorded, set(acked) - recorded
        ok = sum(1 for c in calls if c[2] == grpc.StatusCode.OK)
        assert store.count_completions() >= ok
