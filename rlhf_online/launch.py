"""Run an `rlhf-online` service as a child process: start it, wait until it serves, stop it gracefully.

The demo, the benchmarks and the tests launch services through this one module. It starts the
program by module name (`python -m services.cli serve NAME`), so the library never imports the
services layer. The service listens on 127.0.0.1 (metrics on a free port) and its stderr, the JSON
log, goes to `<log_dir>/<NAME>.log`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf_online.tls import ClientTLS

READY_TIMEOUT_S = 300.0  # loading a model on a busy CPU can take minutes
STOP_TIMEOUT_S = 60.0
LOG_TAIL_CHARS = 3000


class ServiceStartError(RuntimeError):
    """A service exited, or did not report SERVING in time; the message ends with the tail of its log."""


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(name: str, flags: Sequence[str] = (), ranks: int = 1, python: str | None = None) -> list[str]:
    """The command line of `rlhf-online serve NAME FLAGS...` in this interpreter or `python` (another venv's).

    With `ranks` > 1 it runs under torchrun (the trainer).
    """
    if python:
        return [python, "-m", "services.cli", "serve", name, *flags]
    if ranks > 1:  # one machine, `ranks` processes: the trainer on torch.distributed
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        return [torchrun, "--standalone", "--nproc-per-node", str(ranks), "-m", "services.cli", "serve", name, *flags]
    return [sys.executable, "-m", "services.cli", "serve", name, *flags]


@dataclass
class Service:
    """A running `rlhf-online serve NAME` child process."""

    name: str
    proc: subprocess.Popen
    port: int
    log_path: Path
    tls: ClientTLS | None = None  # how to reach it when it serves TLS (None: plaintext)
    terminated: bool = field(default=False, init=False)

    @property
    def address(self) -> str:
        """host:port of its gRPC server."""
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float) -> None:
        """Return once its gRPC health says SERVING; ServiceStartError if it exits or `timeout` s pass."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from rlhf_online.tls import channel as open_channel

        deadline = time.monotonic() + timeout
        # A refused connection backs off up to 2 minutes by default: retry each second while it starts.
        with open_channel(self.address, self.tls, [("grpc.max_reconnect_backoff_ms", 1000)]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise ServiceStartError(self._failure(f"exited with code {self.proc.returncode} before serving"))
                if time.monotonic() > deadline:
                    raise ServiceStartError(self._failure(f"did not report SERVING within {timeout:g} s"))
                with contextlib.suppress(grpc.RpcError):  # not listening yet
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.5)

    def serving_record(self, timeout: float = 30.0) -> dict:
        """Its structured 'serving' log record (the bound ports), waiting up to `timeout` s for it to be written."""
        deadline = time.monotonic() + timeout
        while (record := self._logged("serving")) is None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise ServiceStartError(self._failure("logged no 'serving' record"))
            time.sleep(0.05)
        return record

    def terminate(self) -> None:
        """SIGTERM, once: the service drains and exits."""
        if self.proc.poll() is None and not self.terminated:
            self.proc.send_signal(signal.SIGTERM)
        self.terminated = True

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (graceful drain), SIGKILL after `timeout` s; returns the exit code."""
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The last `chars` characters of its log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _logged(self, msg: str) -> dict | None:
        """Its first JSON log record with this message, if written yet."""
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):  # a line still being written, or not JSON
                    if line.startswith("{") and (record := json.loads(line)).get("msg") == msg:
                        return record
        return None

    def _failure(self, what: str) -> str:
        """What went wrong, where the log is, and its last lines."""
        return f"the {self.name} service {what}; log {self.log_path}, last lines:\n{self.log_tail()}"


def start(name: str, env: dict[str, str], log_dir: Path, port: int | None = None, flags: Sequence[str] = (),
          ready_timeout: float = READY_TIMEOUT_S, tls: ClientTLS | None = None, ranks: int = 1,
          python: str | None = None) -> Service:
    """Start `rlhf-online serve NAME` with `env` over os.environ, on `port` (a free one unless given), once SERVING.

    A service configured to serve TLS is health-checked over TLS with `tls`. A service that fails
    to come up is stopped before ServiceStartError is raised. `ranks` > 1 starts it under torchrun
    (the trainer): rank 0 serves on `port`. `python` runs it in another venv's interpreter.
    """
    port = port or free_port()
    env = {**os.environ, **env, "RLHF_PORT": str(port), "RLHF_METRICS_PORT": "0", "RLHF_HOST": "127.0.0.1"}
    log_path = Path(log_dir) / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command(name, flags, ranks, python), env=env, stdout=subprocess.DEVNULL, stderr=log)
    service = Service(name, proc, port, log_path, tls)
    try:
        service.wait_serving(ready_timeout)
    except BaseException:
        service.stop(timeout=10)
        raise
    return service


@contextlib.contextmanager
def running(name: str, env: dict[str, str], log_dir: Path, port: int | None = None, flags: Sequence[str] = (),
            stop_timeout: float = STOP_TIMEOUT_S, ready_timeout: float = READY_TIMEOUT_S,
            tls: ClientTLS | None = None, ranks: int = 1, python: str | None = None) -> Iterator[Service]:
    """`start` as a context manager: on exit the service gets SIGTERM and `stop_timeout` s to drain, then SIGKILL."""
    service = start(name, env, log_dir, port=port, flags=flags, ready_timeout=ready_timeout, tls=tls, ranks=ranks,
                    python=python)
    try:
        yield service
    finally:
        service.stop(stop_timeout)
