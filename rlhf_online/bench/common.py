"""What every benchmark shares: the machine line, service subprocesses, and writing JSON + Markdown."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def machine() -> str:
    """A one-line description of this machine."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_service(service: str, env: dict[str, str], tmp: Path, port: int | None = None,
                  stop_timeout: float = 60.0) -> Iterator[int]:
    """`rlhf-online serve SERVICE` as a subprocess (on a free port unless given); yields the port once SERVING.

    On exit it is sent SIGTERM and given `stop_timeout` seconds to drain, then killed.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = port or free_port()
    env = {**os.environ, **env, "RLHF_PORT": str(port), "RLHF_METRICS_PORT": "0", "RLHF_HOST": "127.0.0.1"}
    with open(tmp / f"{service}.log", "w") as server_log:
        server = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", service], env=env,
                                  stdout=subprocess.DEVNULL, stderr=server_log)
    try:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        deadline = time.time() + 300
        while True:
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{service} did not start; see {tmp / f'{service}.log'}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    break
            except grpc.RpcError:
                time.sleep(0.5)
        yield port
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def write_report(out: str | Path, name: str, result: dict, lines: list[str]) -> None:
    """<out>/<name>.json and <name>.md, and the table on stdout."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
