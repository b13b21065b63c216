"""The TLS settings every service shares (a base of the services' settings dataclasses), and the
same flags for command-line tools (healthcheck, client, bench).

TLS is on when `--tls-cert` and `--tls-key` are given: the service listens with TLS only and dials
the other services with TLS, presenting its certificate. `--tls-ca` is the trust root of those
calls and, on the internal services, the CA that client certificates must be signed by (mutual TLS).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.common.channel_factory import ChannelFactory
from services.common.config import setting
from services.common.tls import ServerTls, TlsFiles, TlsSource, client_files

CERT_HELP = ("PEM certificate (chain) of this service; with --tls-key, TLS is on (the files are reloaded when they "
             "change)")
KEY_HELP = "PEM private key of --tls-cert"
CA_HELP = ("PEM CA certificate(s): the trust root when calling other services and, on internal services, the CA "
           "client certificates must be signed by (mutual TLS)")
SERVER_NAME_HELP = ("host name to verify in other services' certificates instead of the dialled host (when they are "
                    "dialled by IP)")


@dataclass(slots=True)
class TlsSettings:
    tls_cert: str = setting("", CERT_HELP, "TLS_CERT")
    tls_key: str = setting("", KEY_HELP, "TLS_KEY")
    tls_ca: str = setting("", CA_HELP, "TLS_CA")
    tls_server_name: str = setting("", SERVER_NAME_HELP, "TLS_SERVER_NAME")

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be given together")
        if not self.tls_cert and (self.tls_ca or self.tls_server_name):
            raise ValueError("tls_ca and tls_server_name need tls_cert and tls_key (TLS is on only with a certificate)")
        files = self.tls_files()
        if files is not None:
            files.check()

    def tls_files(self) -> TlsFiles | None:
        return TlsFiles(self.tls_cert, self.tls_key, self.tls_ca, self.tls_server_name) if self.tls_cert else None

    def tls_source(self) -> TlsSource | None:
        """The reloading TLS material (None: plaintext); one per process, shared by server and clients."""
        files = self.tls_files()
        return TlsSource(files) if files else None

    def server_tls(self, source: TlsSource | None) -> ServerTls | None:
        """An internal service requires client certificates whenever it has a CA."""
        return ServerTls(source, require_client_cert=bool(self.tls_ca)) if source else None


@dataclass(slots=True)
class PublicTlsSettings(TlsSettings):
    """The gateway's: its public gRPC and HTTP endpoints ask for no client certificate unless told."""

    tls_require_client_cert: bool = setting(False, "require client certificates signed by --tls-ca on the public "
                                            "gRPC and HTTP endpoints too", "TLS_REQUIRE_CLIENT_CERT")

    def __post_init__(self) -> None:
        TlsSettings.__post_init__(self)
        if self.tls_require_client_cert and not self.tls_ca:
            raise ValueError("tls_require_client_cert needs tls_ca")

    def server_tls(self, source: TlsSource | None) -> ServerTls | None:
        return ServerTls(source, require_client_cert=self.tls_require_client_cert) if source else None


def tls_services(settings: TlsSettings) -> tuple[ChannelFactory, ServerTls | None]:
    """What a service's __main__ needs: the factory of its channels and how its server listens."""
    source = settings.tls_source()
    return ChannelFactory(source), settings.server_tls(source)


def add_tls_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """--tls-ca, --tls-cert, --tls-key and --tls-server-name for a command-line client, defaulting to
    the TLS_* environment variables."""
    env = os.environ if environ is None else environ
    parser.add_argument("--tls", action="store_true", help="use TLS, trusting the system's roots without --tls-ca")
    parser.add_argument("--tls-ca", default=env.get("TLS_CA", ""),
                        help="CA certificate to verify the server with; turns TLS on [env TLS_CA]")
    parser.add_argument("--tls-cert", default=env.get("TLS_CERT", ""),
                        help="client certificate, for servers that require one [env TLS_CERT]")
    parser.add_argument("--tls-key", default=env.get("TLS_KEY", ""), help="key of --tls-cert [env TLS_KEY]")
    parser.add_argument("--tls-server-name", default=env.get("TLS_SERVER_NAME", ""),
                        help="host name to verify in the server's certificate [env TLS_SERVER_NAME]")


def client_tls(args: argparse.Namespace) -> TlsFiles | None:
    """The TLS files of `add_tls_arguments`' flags; None (plaintext) without --tls, a CA or a certificate."""
    return client_files(args.tls, args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)


def sdk_tls_options(args: argparse.Namespace) -> dict[str, Any]:
    """The SDK's TLS keyword arguments (GatewayClient) from `add_tls_arguments`' flags."""
    return {"tls": args.tls, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
            "tls_server_name": args.tls_server_name}
