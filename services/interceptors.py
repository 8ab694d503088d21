"""Cross-cutting RPC work: status-code mapping of domain errors, metrics, admin auth, API keys."""

from __future__ import annotations

import contextvars
import hmac
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import descriptor_pool

from rlhf_online import errors, metrics
from rlhf_online.auth.keys import METADATA_KEY, Identity, KeyAuthenticator

log = logging.getLogger("rlhf_online.rpc")

# A status message past grpc's 16 KiB header limit would reach the client as RESOURCE_EXHAUSTED, not its code.
MAX_DETAILS_CHARS = 512

# The one place where library errors become gRPC status codes.
STATUS_OF: dict[type[errors.RlhfError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
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


def clip(details: str, limit: int = MAX_DETAILS_CHARS) -> str:
    """Status details short enough for grpc's header limit (messages may quote what the client sent)."""
    return details if len(details) <= limit else f"{details[:limit]}... ({len(details) - limit} more characters)"


def _split(full_method: str) -> tuple[str, str]:
    """`/rlhf_online.v1.Generation/Generate` -> ("Generation", "Generate")."""
    _, service, method = full_method.split("/")
    return service.rsplit(".", 1)[-1], method


class _Malformed:
    """Stands in for a request that could not be parsed, so the RPC can answer INVALID_ARGUMENT."""

    def __init__(self, message: str) -> None:
        self.message = message


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _bad_field(data: bytes, message_type: Any, prefix: str = "") -> str:
    """The path of the first string field of a serialized message that is not UTF-8 ("" if none is found)."""
    pos, seen = 0, {}
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            elif wire == 2:
                size, pos = _varint(data, pos)
                chunk, pos = data[pos:pos + size], pos + size
                field = message_type.fields_by_number.get(number)
                if field is None:
                    continue
                name = prefix + field.name
                if field.is_repeated:
                    seen[number] = seen.get(number, -1) + 1
                    name += f"[{seen[number]}]"
                if field.type == field.TYPE_STRING:
                    chunk.decode("utf-8")
                elif field.type == field.TYPE_MESSAGE and (inner := _bad_field(chunk, field.message_type, name + ".")):
                    return inner
            else:
                return ""
    except UnicodeDecodeError:
        return name
    except IndexError:
        return ""
    return ""


def _tolerant(deserialize: Callable, full_method: str) -> Callable:
    """A request deserializer that hands back _Malformed instead of failing (grpc would answer INTERNAL)."""

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:
            message_type, field = None, ""
            try:
                message_type = descriptor_pool.Default().FindMethodByName(full_method[1:].replace("/", ".")).input_type
                field = _bad_field(data, message_type)
            except Exception:  # naming the field is best effort; the answer is INVALID_ARGUMENT either way
                pass
            if field:
                return _Malformed(f"{field}: not valid UTF-8")
            name = message_type.full_name if message_type is not None else "request"
            return _Malformed(f"request: not a valid {name} message")

    return parse


class _Outcome:
    """Records one RPC's status code and latency when it ends."""

    def __init__(self, service: str, method: str) -> None:
        self.service, self.method, self.start = service, method, time.perf_counter()

    def fail(self, error: BaseException, context: grpc.ServicerContext) -> None:
        """Turn an exception into the RPC's status (aborting the call) and record it."""
        if isinstance(error, errors.RlhfError):
            code = status_of(error)
            self.done(code)
            details = error.public_message()
            if code == grpc.StatusCode.INTERNAL or details != str(error):  # the log has what the client is not told
                log.error("rpc failed", extra={"method": self.method, "code": code.name, "error": str(error)})
            context.abort(code, clip(details))
        if not context.is_active():
            # The client cancelled or its deadline passed, and the handler failed on the way out
            # (e.g. frontend.Abandoned: the engine ended the cancelled request without results): no server error.
            self.ended_by_client(context)
            context.abort(self.ended_code(context), "the call ended on the client's side")
        # context.abort() raises; a handler that aborted itself has its code set already.
        code = context.code() if hasattr(context, "code") else None
        if code is not None and code != grpc.StatusCode.OK:
            self.done(code)
            raise error
        self.done(grpc.StatusCode.INTERNAL)
        log.exception("unhandled error in rpc", extra={"method": self.method})
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")

    @staticmethod
    def ended_code(context: grpc.ServicerContext) -> grpc.StatusCode:
        """DEADLINE_EXCEEDED when the client's deadline passed, CANCELLED when it went away before."""
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
            else grpc.StatusCode.CANCELLED

    def ended_by_client(self, context: grpc.ServicerContext) -> None:
        """Count an RPC that the client ended (cancelled, deadline passed)."""
        self.done(self.ended_code(context))

    def done(self, code: grpc.StatusCode) -> None:
        """Count the RPC under its code."""
        count, latency = _series(self.service, self.method, code.name)
        count.inc()
        latency.observe(time.perf_counter() - self.start)


# (service, method, code) -> its request counter and latency histogram: labels() validates and
# takes a lock at every call, a few microseconds of every RPC; the children never change.
_SERIES: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def _series(service: str, method: str, code: str) -> tuple[Any, Any]:
    """The metric children of one RPC series, looked up once."""
    key = (service, method, code)
    series = _SERIES.get(key)
    if series is None:  # two threads may both look it up: labels() gives both the same children
        series = _SERIES[key] = (metrics.GRPC_REQUESTS.labels(*key), metrics.GRPC_LATENCY.labels(*key))
    return series


class ServiceInterceptor(grpc.ServerInterceptor):
    """Maps domain errors to status codes and records every RPC's code and latency."""

    def __init__(self) -> None:
        # method -> (its handler, that handler wrapped): grpc asks for the handler at every call, and
        # wrapping it anew (closures, two namedtuple copies) cost more than some RPCs' own work.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        """Wrap the handler's behaviour (once per method and handler)."""
        handler = continuation(details)
        if handler is None:
            return None
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, details.method)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Any, full_method: str) -> Any:
        """The handler with the tolerant deserializer and the error mapping and metrics around its behaviour."""
        service, method = _split(full_method)
        if (handler.unary_unary or handler.unary_stream) and handler.request_deserializer is not None:
            handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer, full_method))
        if handler.unary_unary:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, service, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._stream(handler.unary_stream, service, method))
        return handler

    @staticmethod
    def _unary(fn: Callable, service: str, method: str) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            outcome = _Outcome(service, method)
            if isinstance(request, _Malformed):
                outcome.done(grpc.StatusCode.INVALID_ARGUMENT)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
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
            if isinstance(request, _Malformed):
                outcome.done(grpc.StatusCode.INVALID_ARGUMENT)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            try:
                yield from fn(request, context)
            except GeneratorExit:
                # grpc stops pulling responses once the client cancelled or its deadline passed.
                outcome.ended_by_client(context)
                raise
            except Exception as e:
                outcome.fail(e, context)
            if context.is_active():
                outcome.done(grpc.StatusCode.OK)
            else:
                outcome.ended_by_client(context)

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
        return _unauthenticated(details.method, "admin RPC: missing or wrong bearer token")


def _unauthenticated(full_method: str, message: str, handler: Any = None) -> grpc.RpcMethodHandler:
    """A handler that ends the call UNAUTHENTICATED before any servicer runs, counted like any other RPC.

    Given the method's own handler, it keeps its (de)serializers and its shape, so a streaming
    method's client gets the status on its stream; without one it reads the request as raw bytes.
    """
    service, method = _split(full_method)

    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        _Outcome(service, method).done(grpc.StatusCode.UNAUTHENTICATED)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(deny)
    make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.unary_unary_rpc_method_handler
    return make(deny, handler.request_deserializer, handler.response_serializer)


# The verified caller of the RPC running on this thread (None: authentication is off for it).
_CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("rlhf_caller", default=None)


def caller() -> Identity | None:
    """The identity ApiKeyInterceptor verified for the current RPC, or None."""
    return _CALLER.get()


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """The methods named need a valid `x-api-key`; the handler finds the caller's identity in `caller()`.

    Refused calls end UNAUTHENTICATED before the handler runs, and are counted like any other RPC.
    """

    def __init__(self, authenticator: KeyAuthenticator, methods: set[str]) -> None:
        self.authenticator = authenticator
        self.methods = methods  # full names: /rlhf_online.v1.Generation/Generate

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        """Wrap the handler so that it runs with the verified identity, or refuse the call."""
        handler = continuation(details)
        if handler is None or details.method not in self.methods:
            return handler
        presented = dict(details.invocation_metadata or ()).get(METADATA_KEY, "")
        presented = presented.decode(errors="replace") if isinstance(presented, bytes) else presented
        try:
            identity = self.authenticator.identify(presented)
        except errors.Unauthenticated as e:
            return _unauthenticated(details.method, str(e), handler)
        if handler.unary_unary:
            return handler._replace(unary_unary=_as_caller(handler.unary_unary, identity))
        if handler.unary_stream:
            return handler._replace(unary_stream=_as_caller_stream(handler.unary_stream, identity))
        return handler


def _as_caller(fn: Callable, identity: Identity) -> Callable:
    """A unary behaviour that runs with `identity` as the caller."""

    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        token = _CALLER.set(identity)
        try:
            return fn(request, context)
        finally:
            _CALLER.reset(token)

    return wrapped


def _as_caller_stream(fn: Callable, identity: Identity) -> Callable:
    """A streaming behaviour that runs with `identity` as the caller (grpc drives it from one thread)."""

    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        token = _CALLER.set(identity)
        try:
            yield from fn(request, context)
        finally:
            _CALLER.reset(token)

    return wrapped
