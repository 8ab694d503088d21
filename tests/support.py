"""Helpers shared by test modules (importable as `support`: pytest's pythonpath names tests/)."""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from prometheus_client import REGISTRY


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> float:
    """Poll until `predicate()` holds; returns the seconds it took (fails the test after `timeout`)."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out after {timeout}s waiting for {what}"
        time.sleep(interval)
    return time.monotonic() - t0


def sample(metric: str, /, **labels: str) -> float:
    """A Prometheus sample of this process (0 when the series does not exist yet)."""
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def admitted(running) -> Callable[[], bool]:
    """True once a generation server's engine has work and none of it is still queued: it is decoding."""
    return lambda: any(b() for b in running.busy) and sample("rlhf_generation_queue_depth") == 0


# PostgreSQL runs on 127.0.0.1:5432 (trust auth, database `test`) on every development and CI machine.
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


@contextmanager
def pg_schema(prefix: str = "t") -> Iterator[str]:
    """A URL to a fresh, empty PostgreSQL schema of its own, dropped afterwards."""
    import uuid

    import psycopg

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_ADMIN}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def post(url: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    """POST JSON; (status, response headers, JSON body), for error statuses too."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


# ---------------------------------------------------------------------------------------------- certificates

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]  # EC: fast to generate


@dataclass(frozen=True)
class Pki:
    """A throwaway CA and what it signed: a server certificate (localhost, 127.0.0.1) and a client certificate."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(directory: Path, name: str = "test") -> Pki:
    """A CA `name`-ca and its server and client certificates under `directory` (openssl, valid one day)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / f"{name}-ca.crt", directory / f"{name}-ca.key"
    _openssl("req", "-x509", *_EC, "-keyout", str(ca_key), "-out", str(ca), "-subj", f"/CN={name}-ca",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    leaves = {}
    for leaf, usage, san in (("server", "serverAuth", ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]),
                             ("client", "clientAuth", [])):
        cert, key = directory / f"{name}-{leaf}.crt", directory / f"{name}-{leaf}.key"
        _openssl("req", "-x509", *_EC, "-CA", str(ca), "-CAkey", str(ca_key), "-keyout", str(key), "-out", str(cert),
                 "-subj", f"/CN={name}-{leaf}", "-addext", "basicConstraints=critical,CA:FALSE",
                 "-addext", f"extendedKeyUsage={usage}", *san)
        leaves[leaf] = (cert, key)
    return Pki(ca, ca_key, *leaves["server"], *leaves["client"])


@contextmanager
def flat_reward_server() -> Iterator[str]:
    """A Reward service (its address) that scores every reply 0, so a gate sees no drop, and has a model."""
    from concurrent import futures

    import grpc

    from rlhf_online.v1 import reward_pb2, reward_pb2_grpc

    class FlatReward(reward_pb2_grpc.RewardServicer):
        def Score(self, request, context):
            return reward_pb2.ScoreResponse(scores=[0.0] * len(request.items), reward_model_version="r000001")

        def GetRewardModel(self, request, context):
            return reward_pb2.RewardModelInfo(version="r000001")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    reward_pb2_grpc.add_RewardServicer_to_server(FlatReward(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def bench_args(module: ModuleType, *argv: str) -> argparse.Namespace:
    """A benchmark module's flags parsed from argv, as `rlhf-online bench NAME argv...` would."""
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(list(argv))
