"""Certificates and probes shared by the TLS tests: a CA made in the test, rotation of a
service's files in place, and the serial number a server presents on a new connection."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.pki import CertificateAuthority, IssuedCertificate, write_private
from services.common.tls import TlsFiles, client_channel

SERVICES = ("gateway", "prefill", "decode", "kvstore")


class Pki:
    """The stack's CA with one identity per service and a client, and an unrelated CA's intruder."""

    def __init__(self, folder: Path) -> None:
        self.authority = CertificateAuthority("test CA")
        ca = self.authority.write_ca(folder / "ca.crt")
        self.files = {name: self.authority.write_identity(folder, name, ca_path=ca) for name in (*SERVICES, "client")}
        self.ca = str(ca)
        stranger = CertificateAuthority("another CA")
        intruder = stranger.write_identity(folder / "other", "intruder")
        self.intruder = TlsFiles(intruder.cert, intruder.key, self.ca)  # trusts our CA, signed by another

    def client(self, server_name: str = "") -> TlsFiles:
        return TlsFiles(self.files["client"].cert, self.files["client"].key, self.ca, server_name)


def install(files: TlsFiles, issued: IssuedCertificate) -> None:
    """Replace a service's key and certificate in place (each file atomically, key first: for a
    moment the two do not match, as in a real rotation)."""
    for path, data in ((files.key, issued.key_pem), (files.cert, issued.cert_pem)):
        temporary = Path(f"{path}.new")
        write_private(temporary, data)
        os.replace(temporary, path)


def presented_serial(address: str, client: TlsFiles) -> int:
    """The serial number of the certificate a server presents on a brand-new TLS connection."""
    host, port = address.rsplit(":", 1)
    context = client.ssl_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=client.server_name or host) as connection:
        der = connection.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def health_code(address: str, tls: TlsFiles | None) -> grpc.StatusCode:
    """OK if a Health.Check on a new channel succeeds, else the failure's code."""
    with client_channel(grpc, address, tls) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


def no_client_cert(files: TlsFiles) -> TlsFiles:
    """Trust the same CA, present no certificate."""
    return TlsFiles(ca=files.ca, server_name=files.server_name)
