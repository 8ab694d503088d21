"""Building, starting and gracefully stopping a gRPC server with health, reflection, metrics and TLS.

With TLS on, probes that cannot speak it (kubelet's gRPC probes) ask a second, plaintext server on
--health-port that serves grpc.health.v1 only: the same health servicer, so draining shows there too.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rlhf_online.config import CommonSettings
from rlhf_online.metrics import serve_metrics
from rlhf_online.tls import server_credentials
from services.interceptors import AdminAuthInterceptor, ServiceInterceptor

log = logging.getLogger("rlhf_online.server")

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass
class RunningServer:
    """A started server: its ports, its health servicer, and how to stop it."""

    server: grpc.Server
    port: int
    metrics_port: int | None
    health: health.HealthServicer
    http_port: int | None = None
    health_port: int | None = None  # the plaintext health-only server's port (None: there is none)
    health_server: grpc.Server | None = None
    on_drain: list[Callable[[], None]] = field(default_factory=list)
    on_stopped: list[Callable[[], None]] = field(default_factory=list)
    busy: list[Callable[[], bool]] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)

    def shutdown(self, grace: float) -> None:
        """Drain: health NOT_SERVING, refuse new work, let in-flight RPCs finish within `grace`, then stop."""
        if self.stopped.is_set():
            return
        log.info("draining", extra={"grace_seconds": grace})
        deadline = time.monotonic() + grace
        # Refuse new work before health says NOT_SERVING: whoever sees NOT_SERVING must find new
        # requests refused (the other order let one slip in between, under load).
        for fn in self.on_drain:
            fn()
        self.health.enter_graceful_shutdown()
        # The server keeps answering meanwhile, so probes see NOT_SERVING and new work gets UNAVAILABLE.
        while any(b() for b in self.busy) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.server.stop(max(0.0, deadline - time.monotonic())).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        for fn in self.on_stopped:
            fn()
        self.stopped.set()
        log.info("stopped")

    def shutdown_on_signal(self, grace: float) -> None:
        """On SIGTERM/SIGINT, shut down gracefully in a helper thread (the main thread may be busy decoding)."""

        def handler(signum: int, _frame: object) -> None:
            log.info("signal received", extra={"signal": signal.Signals(signum).name})
            threading.Thread(target=self.shutdown, args=(grace,), name="shutdown").start()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)


def start_server(settings: CommonSettings, service_names: Iterable[str], add: Callable[[grpc.Server], None],
                 *, workers: int = 16, admin_methods: set[str] | None = None,
                 metrics: bool = True, auth: grpc.ServerInterceptor | None = None) -> RunningServer:
    """Create, bind and start a server; `add` registers the servicers. Port 0 binds a free port.

    `auth` (an ApiKeyInterceptor) runs outside the error mapping: it refuses before the handler runs.
    """
    interceptors: list[grpc.ServerInterceptor] = [ServiceInterceptor()]
    if auth is not None:
        interceptors.insert(0, auth)
    if settings.admin_token and admin_methods:
        interceptors.insert(0, AdminAuthInterceptor(settings.admin_token, admin_methods))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        interceptors=interceptors,
        # Beyond this many concurrent RPCs grpc itself answers RESOURCE_EXHAUSTED.
        maximum_concurrent_rpcs=workers,
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.so_reuseport", 0)],
    )
    add(server)
    names = list(service_names)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert:
        port = server.add_secure_port(address, server_credentials(settings.tls_cert, settings.tls_key,
                                                                  settings.tls_client_ca))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"port: could not bind {address}")
    health_server, health_port = (start_health_server(settings.host, settings.health_port, health_servicer)
                                  if settings.health_port >= 0 else (None, None))
    server.start()
    metrics_port = serve_metrics(settings.metrics_port, settings.host) if metrics else None
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", extra={"services": names, "port": port, "metrics_port": metrics_port,
                               "health_port": health_port, "tls": bool(settings.tls_cert),
                               "client_certificates": bool(settings.tls_client_ca)})
    return RunningServer(server, port, metrics_port, health_servicer, health_port=health_port,
                         health_server=health_server)


def start_health_server(host: str, port: int, servicer: health.HealthServicer) -> tuple[grpc.Server, int]:
    """A plaintext server with grpc.health.v1 only (the main server's servicer), started; and its bound port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
                         maximum_concurrent_rpcs=8, options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"health_port: could not bind {host}:{port}")
    server.start()
    return server, bound
