"""`rlhf-online serve generation` as a process: starts, answers, logs JSON, and exits 0 on SIGTERM."""

from __future__ import annotations

import json

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import make_pki

from rlhf_online import launch
from rlhf_online.v1 import generation_pb2 as pb
from rlhf_online.v1 import generation_pb2_grpc as pb_grpc


def test_serve_answers_then_drains_on_sigterm(tiny_model_dir, tmp_path):
    env = {"RLHF_BASE_MODEL": str(tiny_model_dir), "RLHF_DATA_DIR": str(tmp_path), "RLHF_GRACE_SECONDS": "10"}
    with launch.running("generation", env, tmp_path, ready_timeout=120) as service:
        assert service.serving_record()["port"] == service.port  # the 'serving' log line carries the port
        records = [json.loads(line) for line in service.log_path.read_text().splitlines() if line.startswith("{")]
        assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)  # structured logs
        channel = grpc.insecure_channel(service.address)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.GenerationStub(channel)
        r = stub.Generate(pb.GenerateRequest(prompt="Hello", params=pb.SamplingParams(max_new_tokens=5)), timeout=60)
        assert r.completions[0].completion_tokens == 5
        assert (tmp_path / "rlhf.db").exists()  # the default store lives under the data dir
        assert service.stop(timeout=30) == 0, service.log_tail()


def test_serve_reward_over_mutual_tls_with_a_plaintext_health_port(tmp_path):
    from rlhf_online.tls import ClientTLS, channel
    from rlhf_online.v1 import reward_pb2 as rw
    from rlhf_online.v1 import reward_pb2_grpc as rw_grpc

    pki = make_pki(tmp_path / "pki")
    # As the Kubernetes TLS component configures it: files from a Secret volume, named by RLHF_* variables.
    env = {"RLHF_DATA_DIR": str(tmp_path), "RLHF_REWARD_MODEL": "sentiment", "RLHF_TLS_CERT": str(pki.server_cert),
           "RLHF_TLS_KEY": str(pki.server_key), "RLHF_TLS_CLIENT_CA": str(pki.ca), "RLHF_HEALTH_PORT": "0"}
    client = ClientTLS(pki.ca, pki.client_cert, pki.client_key)
    with launch.running("reward", env, tmp_path, ready_timeout=120, tls=client) as service:  # health-checked over mTLS
        record = service.serving_record()
        assert record["tls"] is True and record["client_certificates"] is True
        request = rw.ScoreRequest(items=[rw.ScoreItem(prompt="Hi", completion="Lovely!")])
        assert len(rw_grpc.RewardStub(channel(service.address, client)).Score(request, timeout=30).scores) == 1
        plain = grpc.insecure_channel(f"127.0.0.1:{record['health_port']}")
        assert health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert service.stop(timeout=30) == 0, service.log_tail()
