"""Helpers shared by test modules (importable as `support`: pytest's pythonpath names tests/)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
