"""`rlhf-online serve generation` as a process: starts, answers, logs JSON, and exits 0 on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf_online.v1 import generation_pb2 as pb
from rlhf_online.v1 import generation_pb2_grpc as pb_grpc


def test_serve_answers_then_drains_on_sigterm(tiny_model_dir, tmp_path):
    env = {**os.environ, "RLHF_BASE_MODEL": str(tiny_model_dir), "RLHF_DATA_DIR": str(tmp_path),
           "RLHF_PORT": "0", "RLHF_METRICS_PORT": "0", "RLHF_HOST": "127.0.0.1", "RLHF_GRACE_SECONDS": "10"}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "generation"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.time() + 120
        while port is None and time.time() < deadline:
            line = proc.stderr.readline()
            assert line, f"server exited early: {proc.wait()}"
            if line.startswith("{"):
                record = json.loads(line)  # every log line is structured
                assert {"ts", "level", "logger", "msg"} <= set(record)
                if record["msg"] == "serving":
                    port = record["port"]
        assert port, "no 'serving' log line with the port"
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.GenerationStub(channel)
        r = stub.Generate(pb.GenerateRequest(prompt="Hello", params=pb.SamplingParams(max_new_tokens=5)), timeout=60)
        assert r.completions[0].completion_tokens == 5
        assert (tmp_path / "rlhf.db").exists()  # the default store lives under the data dir
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
