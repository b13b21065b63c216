"""TLS material of a service (certificate, private key, CA) and the gRPC credentials made from it.

The files are read again when they change (cert-manager rotates them in place): `TlsSource`
re-reads them on `refresh()`, checks the new certificate and key belong together, and only then
adopts them as a new `TlsMaterial` object; a half-written rotation (new certificate, old key) keeps
the previous material until the files agree. Consumers notice a change by the identity of
`TlsMaterial`:

- gRPC servers use `dynamic_ssl_server_credentials`, whose fetcher grpc calls before every new
  handshake; it hands grpc a new certificate configuration when the material changed.
- clients (`services.common.channel_factory`) make new channels with the new material.
- the HTTP API (`services.common.tls_http`) gives each new handshake a context built from the
  new files.

With a CA, internal servers require client certificates signed by it (mutual TLS) and clients
trust only it; without one, clients use the system's trust roots and servers ask for no client
certificate.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.common.targets import RECONNECT_OPTIONS, channel_target

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where TLS material lives. A service has a certificate and key (and normally a CA); a client
    outside the services (SDK, CLI, health check) may have only a CA, or nothing (the system's
    trust roots). `server_name` overrides the host name verified in the server's certificate
    (grpc.ssl_target_name_override)."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    server_name: str = ""

    def check(self) -> None:
        """Raise ValueError unless the files exist and hold a certificate and its key (and a CA)."""
        for name, path in (("tls_cert", self.cert), ("tls_key", self.key), ("tls_ca", self.ca)):
            if path and not Path(path).is_file():
                raise ValueError(f"{name} {path!r} does not exist")
        TlsMaterial.read(self)

    def client_credentials(self) -> grpc.ChannelCredentials:
        """Read once: trust `ca` (the system's roots without one), present `cert` when given."""
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        ca, cert, key = (Path(path).read_bytes() if path else None for path in (self.ca, self.cert, self.key))
        return grpc.ssl_channel_credentials(ca, key, cert)

    def environment(self) -> dict[str, str]:
        """The TLS_* environment variables that give a service (or a health check) these files."""
        values = {"TLS_CERT": self.cert, "TLS_KEY": self.key, "TLS_CA": self.ca, "TLS_SERVER_NAME": self.server_name}
        return {name: value for name, value in values.items() if value}

    def ssl_context(self) -> ssl.SSLContext:
        """A client SSLContext (for HTTPS, e.g. httpx's verify=) with the same trust and certificate."""
        context = ssl.create_default_context(cafile=self.ca or None)
        if self.cert:
            context.load_cert_chain(self.cert, self.key)
        return context

    def channel_options(self) -> list[tuple[str, str]]:
        """The host name verified in the server's certificate, when it is not the dialled host."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


@dataclass(frozen=True, slots=True, eq=False)
class TlsMaterial:
    """The PEM bytes of one version of the files (compared by identity: a new object is a change)."""

    cert: bytes
    key: bytes
    ca: bytes | None
    serial: int

    @staticmethod
    def read(files: TlsFiles) -> TlsMaterial:
        raw = _read(files)
        return TlsMaterial(*raw, serial=_check(files, *raw))


def _read(files: TlsFiles) -> tuple[bytes, bytes, bytes | None]:
    try:
        return (Path(files.cert).read_bytes(), Path(files.key).read_bytes(),
                Path(files.ca).read_bytes() if files.ca else None)
    except OSError as exc:
        raise ValueError(f"cannot read TLS files: {exc}") from exc


def _check(files: TlsFiles, cert_pem: bytes, key_pem: bytes, ca_pem: bytes | None) -> int:
    """The certificate's serial number, after checking that the key belongs to it. ValueError if not."""
    try:
        certificate = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError as exc:
        raise ValueError(f"tls_cert {files.cert!r} holds no PEM certificate") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"tls_key {files.key!r} holds no unencrypted PEM private key") from exc
    public = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*public) != key.public_key().public_bytes(*public):
        raise ValueError(f"tls_key {files.key!r} is not the key of tls_cert {files.cert!r}")
    if ca_pem is not None:
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError as exc:
            raise ValueError(f"tls_ca {files.ca!r} holds no PEM certificate") from exc
    return certificate.serial_number


class TlsSource:
    """The current material of `files`, re-read on `refresh` (thread-safe: grpc calls the server's
    fetcher from its own threads)."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._material = TlsMaterial.read(files)
        self._seen = (self._material.cert, self._material.key, self._material.ca)
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @property
    def current(self) -> TlsMaterial:
        return self._material

    def refresh(self, min_interval_seconds: float = 0.0) -> TlsMaterial:
        """Read the files again (unless they were read less than `min_interval_seconds` ago) and
        return the current material: a new object when the files changed and are consistent."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked < min_interval_seconds:
                return self._material
            self._checked = now
            try:
                raw = _read(self.files)
            except ValueError as exc:
                log.warning("keeping the current TLS certificate: %s", exc)
                return self._material
            if raw == self._seen:
                return self._material
            self._seen = raw
            try:
                self._material = TlsMaterial(*raw, serial=_check(self.files, *raw))
            except ValueError as exc:  # e.g. a rotation half written; the next change is read again
                log.warning("keeping the current TLS certificate until the files agree: %s", exc)
                return self._material
            log.info("TLS certificate %s reloaded (serial %x)", self.files.cert, self._material.serial)
            return self._material


def channel_credentials(material: TlsMaterial) -> grpc.ChannelCredentials:
    """Trust the CA (or the system roots without one) and present our certificate as a client."""
    return grpc.ssl_channel_credentials(material.ca, material.key, material.cert)


@dataclass(frozen=True, slots=True)
class ServerTls:
    """How a gRPC server listens: TLS from `source`, optionally requiring client certificates
    signed by the source's CA."""

    source: TlsSource
    require_client_cert: bool

    def _configuration(self, material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
        roots = material.ca if self.require_client_cert else None
        return grpc.ssl_server_certificate_configuration([(material.key, material.cert)], roots)

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials whose fetcher grpc calls before every new handshake: it returns a new
        configuration when the files changed since the last one it handed out, else None."""
        applied = self.source.current

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal applied
            try:
                material = self.source.refresh()
                if material is applied:
                    return None
                configuration = self._configuration(material)
                applied = material
                return configuration
            except Exception:  # noqa: BLE001 - never fail a handshake because of a reload
                log.exception("TLS reload failed; keeping the current certificate")
                return None

        return grpc.dynamic_ssl_server_credentials(self._configuration(applied), fetch,
                                                   require_client_authentication=self.require_client_cert)

    def describe(self) -> str:
        return "TLS, client certificates required" if self.require_client_cert else "TLS"


def client_files(tls: bool = False, ca: str | None = None, cert: str | None = None, key: str | None = None,
                 server_name: str | None = None) -> TlsFiles | None:
    """A client's TLS files: None (plaintext) unless `tls` is set or a CA or a certificate is given."""
    files = TlsFiles(cert or "", key or "", ca or "", server_name or "")
    return files if tls or files.ca or files.cert else None


CLIENT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def client_channel(module: ModuleType, address: str | Sequence[str], tls: TlsFiles | None) -> Any:
    """A channel of `module` (grpc or grpc.aio) from outside the services: plaintext, or TLS with
    `tls` read once. Several addresses (a comma separated list) make one round-robin channel over
    the servers whose health is SERVING (services/common/targets.py)."""
    target = channel_target(address)
    # A response may carry a long prompt's log-probabilities (~155 bytes a token with 20 alternatives).
    options = [*target.options, *RECONNECT_OPTIONS, ("grpc.max_receive_message_length", CLIENT_MAX_MESSAGE_BYTES)]
    if tls is None:
        return module.insecure_channel(target.target, options=options)
    return module.secure_channel(target.target, tls.client_credentials(), options=[*options, *tls.channel_options()])


def add_port(server: grpc.aio.Server, address: str, tls: ServerTls | None) -> int:
    """Listen on `address`, with TLS only when `tls` is given; the port, 0 on failure."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.credentials())
