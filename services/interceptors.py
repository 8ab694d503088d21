"""Cross-cutting RPC work: status-code mapping of domain errors, metrics, admin auth."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from rlhf_online import errors, metrics

log = logging.getLogger("rlhf_online.rpc")

# The one place where library errors become gRPC status codes.
STATUS_OF: dict[type[errors.RlhfError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(error: errors.RlhfError) -> grpc.StatusCode:
    """The gRPC code for a domain error (INTERNAL for one not in the table)."""
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def _split(full_method: str) -> tuple[str, str]:
    """`/rlhf_online.v1.Generation/Generate` -> ("Generation", "Generate")."""
    _, service, method = full_method.split("/")
    return service.rsplit(".", 1)[-1], method


class _Outcome:
    """Records one RPC's status code and latency when it ends."""

    def __init__(self, service: str, method: str) -> None:
        self.service, self.method, self.start = service, method, time.perf_counter()

    def fail(self, error: BaseException, context: grpc.ServicerContext) -> None:
        """Turn an exception into the RPC's status (aborting the call) and record it."""
        if isinstance(error, errors.RlhfError):
            code = status_of(error)
            self.done(code)
            if code == grpc.StatusCode.INTERNAL:
                log.error("rpc failed", extra={"method": self.method, "error": str(error)})
            context.abort(code, str(error))
        # context.abort() raises; a handler that aborted itself has its code set already.
        code = context.code() if hasattr(context, "code") else None
        if code is not None and code != grpc.StatusCode.OK:
            self.done(code)
            raise error
        self.done(grpc.StatusCode.INTERNAL)
        log.exception("unhandled error in rpc", extra={"method": self.method})
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")

    def done(self, code: grpc.StatusCode) -> None:
        """Count the RPC under its code."""
        name = code.name
        metrics.GRPC_REQUESTS.labels(self.service, self.method, name).inc()
        metrics.GRPC_LATENCY.labels(self.service, self.method, name).observe(time.perf_counter() - self.start)


class ServiceInterceptor(grpc.ServerInterceptor):
    """Maps domain errors to status codes and records every RPC's code and latency."""

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        """Wrap the handler's behaviour."""
        handler = continuation(details)
        if handler is None:
            return None
        service, method = _split(details.method)
        if handler.unary_unary:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, service, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._stream(handler.unary_stream, service, method))
        return handler

    @staticmethod
    def _unary(fn: Callable, service: str, method: str) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            outcome = _Outcome(service, method)
            try:
                response = fn(request, context)
            except Exception as e:
                outcome.fail(e, context)
            outcome.done(grpc.StatusCode.OK)
            return response

        return wrapped

    @staticmethod
    def _stream(fn: Callable, service: str, method: str) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            outcome = _Outcome(service, method)
            try:
                yield from fn(request, context)
            except Exception as e:
                outcome.fail(e, context)
            outcome.done(grpc.StatusCode.CANCELLED if not context.is_active() else grpc.StatusCode.OK)

        return wrapped


class AdminAuthInterceptor(grpc.ServerInterceptor):
    """Admin RPCs need `authorization: Bearer <token>` when a token is configured."""

    def __init__(self, token: str, admin_methods: set[str]) -> None:
        self.token = token.encode()
        self.admin_methods = admin_methods  # full names: /rlhf_online.v1.Trainer/RunRound

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        """Refuse an admin RPC without the right token before the handler runs."""
        if not self.token or details.method not in self.admin_methods:
            return continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        expected = b"Bearer " + self.token
        # Constant-time compare so the token cannot be guessed byte by byte from timings.
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, expected):
            return continuation(details)
        service, method = _split(details.method)

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            _Outcome(service, method).done(grpc.StatusCode.UNAUTHENTICATED)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin RPC: missing or wrong bearer token")

        return grpc.unary_unary_rpc_method_handler(deny)
