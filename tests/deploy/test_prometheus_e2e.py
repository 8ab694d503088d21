"""End to end: a real Prometheus server on loopback scrapes a running generation service.

The generation service runs in-process on the tiny model (gRPC and /metrics on free ports); the
Prometheus binary (Debian package) gets a temporary config with a 1 s scrape and evaluation
interval and the project's alert rules, and the test reads everything back through Prometheus'
HTTP API, as a dashboard or an alert would.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request

import grpc
import pytest
import yaml
from prometheus_client import REGISTRY

from rlhf_online.config import GenerationSettings
from rlhf_online.launch import free_port
from rlhf_online.store import open_store
from rlhf_online.v1 import generation_pb2 as pb
from rlhf_online.v1 import generation_pb2_grpc as pb_grpc
from services.bootstrap import engine_config
from services.generation import start_generation_server


def api(base: str, path: str, **params: str) -> dict:
    """GET Prometheus' HTTP API; the `data` of a success response."""
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    body = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert body["status"] == "success", body
    return body["data"]


def wait_for(check, timeout: float, what: str):
    """Poll `check()` until it returns something truthy."""
    end = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < end:
        try:
            last = check()
            if last:
                return last
        except (OSError, ValueError) as e:  # not up yet
            last = e
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@pytest.fixture
def generation(make_engine, tmp_path):
    """A generation service in-process: (running server, stub)."""
    settings = GenerationSettings(port=0, metrics_port=0, host="127.0.0.1", data_dir=tmp_path,
                                  store_url=f"sqlite:///{tmp_path / 'store.db'}", grace_seconds=1)
    cfg = engine_config(settings)
    engine = make_engine(max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue, limits=cfg.limits)
    running = start_generation_server(settings, engine, open_store(settings.store_url))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, pb_grpc.GenerationStub(channel)
    channel.close()
    running.shutdown(1)


@pytest.fixture
def prometheus(kit, tmp_path):
    """Start Prometheus with a config built by the test; yields a function(targets) -> base URL."""
    binary = kit.tool("prometheus")
    procs: list[subprocess.Popen] = []
    logs = []

    def start(targets: list[str]) -> str:
        rules = tmp_path / "rules.yaml"
        rules.write_text((kit.monitoring / "rules.yaml").read_text())
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "rlhf-generation", "static_configs": [{"targets": targets}]}],
        }))
        port = free_port()
        log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 - closed after the process
        logs.append(log)
        procs.append(subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if procs[-1].poll() is not None:
                pytest.fail(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
            return urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200

        wait_for(ready, 30, "prometheus /-/ready")
        return base

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for log in logs:
        log.close()


def test_prometheus_scrapes_the_generation_service_and_evaluates_the_rules(kit, generation, prometheus):
    running, stub = generation
    r = stub.Generate(pb.GenerateRequest(prompt="Say something kind.", n=2,
                                         params=pb.SamplingParams(max_new_tokens=4, temperature=0.0)), timeout=30)
    stub.SubmitFeedback(pb.SubmitFeedbackRequest(completion_id=r.completions[0].completion_id,
                                                 rating=pb.RATING_THUMBS_UP, user_id="u1"), timeout=5)
    target = f"127.0.0.1:{running.metrics_port}"
    base = prometheus([target])

    # the scrape target is up
    def target_up():
        active = api(base, "/api/v1/targets")["activeTargets"]
        return [t for t in active if t["labels"]["instance"] == target and t["health"] == "up"]

    wait_for(target_up, 20, f"target {target} up")

    # the rlhf_ series arrive with the values the service counted (the registry is per process:
    # earlier tests in the same run count too, so compare with it rather than with constants)
    def sample(query: str) -> float | None:
        result = api(base, "/api/v1/query", query=query)["result"]
        return float(result[0]["value"][1]) if result else None

    checks = [("rlhf_generation_tokens_total", {}), ("rlhf_completions_logged_total", {}),
              ("rlhf_grpc_requests_total", {"service": "Generation", "method": "Generate", "code": "OK"}),
              ("rlhf_feedback_total", {"rating": "thumbs_up"}), ("rlhf_policy_version", {"role": "stable"})]
    for name, labels in checks:
        want = REGISTRY.get_sample_value(name, labels)
        assert want is not None, (name, labels)
        query = name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        wait_for(lambda q=query, w=want: sample(q) == w, 10, f"{query} == {want} in Prometheus")
    assert REGISTRY.get_sample_value("rlhf_generation_tokens_total") >= 8  # two candidates of 4 tokens

    names = set(api(base, "/api/v1/label/__name__/values"))
    rlhf = {n for n in names if n.startswith("rlhf_")}
    for want in ("rlhf_grpc_requests_total", "rlhf_grpc_request_duration_seconds_bucket",
                 "rlhf_generation_time_to_first_token_seconds_bucket", "rlhf_generation_batch_size_bucket",
                 "rlhf_generation_queue_depth", "rlhf_generation_running_rows", "rlhf_feedback_total",
                 "rlhf_preferences_total", "rlhf_adapters_loaded"):
        assert want in rlhf, f"{want} not scraped; got {sorted(rlhf)}"
    series = api(base, "/api/v1/series", **{"match[]": '{__name__=~"rlhf_.+", job="rlhf-generation"}'})
    assert len(series) >= 20 and all(s["instance"] == target for s in series)

    # the alert rules are loaded and evaluate against the real series without errors
    def evaluated():
        groups = api(base, "/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

    rules = wait_for(evaluated, 15, "every rule evaluated once")
    shipped = yaml.safe_load((kit.monitoring / "rules.yaml").read_text())["groups"]
    assert sorted(r["name"] for r in rules) == sorted(r["alert"] for g in shipped for r in g["rules"])
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
