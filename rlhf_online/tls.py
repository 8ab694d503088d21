"""TLS for gRPC: PEM checks, server credentials (optionally requiring client certificates) and client channels.

Servers take --tls-cert/--tls-key, and with --tls-client-ca they require a client certificate
signed by that CA (mutual TLS). A client speaks TLS when it has a CA bundle to verify the server
with (ClientTLS), and presents its own certificate when one is configured. Every file is checked
once at start with a ConfigError naming the setting; no check ever quotes a file's contents.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from rlhf_online.errors import ConfigError

CERTIFICATE, KEY, CA = "certificate", "key", "CA bundle"
# What a PEM block of each kind is labelled ("-----BEGIN <label>-----"); a key may be PKCS#8, RSA or EC.
_LABELS = {CERTIFICATE: (b"CERTIFICATE-----",), KEY: (b"PRIVATE KEY-----",), CA: (b"CERTIFICATE-----",)}


def _pem_problem(path: Path, kind: str) -> str:
    """Why `path` is no usable PEM file of this kind ("" if it is); never quotes what the file holds."""
    if not Path(path).is_file():
        return "is not an existing file"
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f"cannot be read ({e.strerror or type(e).__name__})"
    blocks = [line for line in data.splitlines() if line.startswith(b"-----BEGIN ")]
    if not any(line.endswith(label) for line in blocks for label in _LABELS[kind]):
        return f"holds no PEM {kind} (no '-----BEGIN ...{_LABELS[kind][0].decode()}' line)"
    if kind == KEY and (any(b"ENCRYPTED" in line for line in blocks) or b"Proc-Type: 4,ENCRYPTED" in data):
        return "is an encrypted key (gRPC needs it unencrypted; the Secret or volume protects it)"
    return ""


def check_file(setting: str, path: Path, kind: str, hint: str = "") -> None:
    """ConfigError naming `setting` unless `path` is a readable PEM file of `kind` (CERTIFICATE, KEY or CA)."""
    problem = _pem_problem(path, kind)
    if not problem and kind == CA:
        try:  # the bundle must hold at least one certificate OpenSSL can parse
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
        except ssl.SSLError as e:
            problem = f"is no usable CA bundle ({e.reason or 'unparsable'})"
    if problem:
        raise ConfigError(f"{setting}: {str(path)!r} {problem}{'; ' + hint if hint else ''}")


def check_pair(settings: tuple[str, str], cert: Path, key: Path, hint: str = "") -> None:
    """ConfigError unless `cert` and `key` are PEM files and the key is the certificate's (names both settings)."""
    check_file(settings[0], cert, CERTIFICATE, hint)
    check_file(settings[1], key, KEY, hint)
    try:
        # A throwaway password: an encrypted key fails here instead of OpenSSL prompting on a terminal.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key), password=lambda: b"")
    except ssl.SSLError as e:
        raise ConfigError(f"{settings[1]}: {str(key)!r} is not the key of {settings[0]} {str(cert)!r} "
                          f"({e.reason or 'unparsable'}){'; ' + hint if hint else ''}") from None


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """Credentials of a TLS server; with `client_ca`, every client must present a certificate signed by it."""
    pair = [(Path(key).read_bytes(), Path(cert).read_bytes())]
    if client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=Path(client_ca).read_bytes(),
                                       require_client_auth=True)


@dataclass(frozen=True)
class ClientTLS:
    """How a client speaks TLS: the CA bundle that verifies the server, and its own certificate for mutual TLS."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def check(self, hint: str = "") -> ClientTLS:
        """Itself, once every file passed its check (else a ConfigError naming tls_ca, tls_client_cert or _key)."""
        check_file("tls_ca", self.ca, CA, hint)
        if bool(self.cert) != bool(self.key):
            raise ConfigError(f"tls_client_cert/tls_client_key: set both or neither{'; ' + hint if hint else ''}")
        if self.cert and self.key:
            check_pair(("tls_client_cert", "tls_client_key"), self.cert, self.key, hint)
        return self

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials, read from the files now (a renewed certificate counts from the next channel)."""
        own = (Path(self.key).read_bytes(), Path(self.cert).read_bytes()) if self.cert and self.key else (None, None)
        return grpc.ssl_channel_credentials(root_certificates=Path(self.ca).read_bytes(), private_key=own[0],
                                            certificate_chain=own[1])


def channel(address: str, tls: ClientTLS | None = None,
            options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A channel to `address` (host:port): TLS verified against `tls.ca` when given, plaintext otherwise."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, tls.credentials(), options=list(options))
