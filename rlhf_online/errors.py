"""Domain errors raised by the library; services map them to gRPC status codes in one place."""

from __future__ import annotations


class RlhfError(Exception):
    """Base class of every error the library raises on purpose."""

    def public_message(self) -> str:
        """What a client may be told (the message: written for callers, it names a field or an id, never a file)."""
        return str(self)


class InvalidArgument(RlhfError):
    """A request field is malformed or out of range; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(RlhfError):
    """An id (completion, policy version, ...) does not exist."""

    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(f"{kind} {ident!r} not found")
        self.kind = kind
        self.ident = ident


class Unauthenticated(RlhfError):
    """The call carries no valid credential (API key) where one is required."""


class PermissionDenied(RlhfError):
    """The caller is known but may not do this (rate a reply served to someone else)."""


class ResourceExhausted(RlhfError):
    """The server is at capacity (queue full); the client should back off and retry."""


class DeadlineExceeded(RlhfError):
    """The client's deadline passed before the work finished; the work was stopped."""


class Unavailable(RlhfError):
    """The server is draining or not ready; retry on another replica."""


class ConfigError(RlhfError):
    """A setting has a bad value; the message names the setting and the value."""

    def public_message(self) -> str:
        """The setting only: the message is the operator's (it may name files, URLs or hosts)."""
        setting = str(self).partition(":")[0]
        return f"{setting}: the server's configuration does not allow this; its log has the details"
