"""TLS of an HTTP server (the gateway's OpenAI-compatible API under uvicorn), reloaded without a restart.

The listening SSLContext has a server-name callback, which OpenSSL runs for every handshake (with
or without SNI); it asks the TlsSource whether the files changed and, if so, builds a new context
from them, then hands the handshake the current context. A context that cannot be built (a
rotation half written) leaves the previous one in place; the next handshake tries again.
"""

from __future__ import annotations

import logging
import ssl

from services.common.tls import ServerTls, TlsMaterial

log = logging.getLogger(__name__)


class ReloadingSslContext:
    """`listening` is the context to give the server; handshakes get the newest certificate."""

    def __init__(self, tls: ServerTls) -> None:
        self._tls = tls
        self._material: TlsMaterial = tls.source.current
        self._current = self._build()
        self.listening = self._build()
        self.listening.sni_callback = self._select

    def _build(self) -> ssl.SSLContext:
        files = self._tls.source.files
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(files.cert, files.key)
        if self._tls.require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=files.ca)
        return context

    def current(self) -> ssl.SSLContext:
        """The context of the next handshake, rebuilt first if the files changed."""
        material = self._tls.source.refresh()
        if material is not self._material:
            try:
                self._current = self._build()
            except (OSError, ssl.SSLError) as exc:
                log.warning("keeping the current HTTPS certificate: %s", exc)
            else:
                self._material = material
                log.info("HTTPS certificate reloaded (serial %x)", material.serial)
        return self._current

    def _select(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                _listening: ssl.SSLContext) -> None:
        try:
            connection.context = self.current()
        except Exception:  # noqa: BLE001 - a reload problem must not fail the handshake
            log.exception("HTTPS certificate reload failed; serving the current one")
