"""A throwaway certificate authority for development stacks and tests (`make up UP_ARGS=--tls`).

Production certificates come from elsewhere (cert-manager, a company CA); this module only makes
a self-signed CA and certificates it signs, each valid for both server and client authentication
(every service is a server and a client of the others), with DNS and IP subject alternative names.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.tls import TlsFiles

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
VALIDITY = datetime.timedelta(days=30)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "disagg-serve"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    cert_pem: bytes
    key_pem: bytes
    serial: int


class CertificateAuthority:
    """A self-signed CA (EC P-256) that issues leaf certificates."""

    def __init__(self, common_name: str = "disagg-serve development CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
                      .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                      .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
                      .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                      .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                   content_commitment=False, key_encipherment=False,
                                                   data_encipherment=False, key_agreement=False,
                                                   encipher_only=False, decipher_only=False), critical=True)
                      .sign(self._key, hashes.SHA256()))

    @property
    def cert_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, hosts: Sequence[str] = DEFAULT_HOSTS) -> IssuedCertificate:
        """A leaf certificate for server and client authentication naming `hosts` (DNS names or IPs)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        serial = x509.random_serial_number()
        cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(self._cert.subject)
                .public_key(key.public_key()).serial_number(serial)
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(_san(hosts), critical=False)
                .sign(self._key, hashes.SHA256()))
        return IssuedCertificate(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), serial)

    def write_ca(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.cert_pem)
        return path

    def write_identity(self, folder: Path, name: str, hosts: Sequence[str] = DEFAULT_HOSTS,
                       ca_path: Path | None = None) -> TlsFiles:
        """Issue a certificate for `name` and write `name.crt` and `name.key` (mode 0600) into
        `folder`; returns the files (the CA is written as `ca.crt` unless `ca_path` names it)."""
        folder.mkdir(parents=True, exist_ok=True)
        ca_path = ca_path or self.write_ca(folder / "ca.crt")
        issued = self.issue(name, hosts)
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        write_private(key_path, issued.key_pem)
        cert_path.write_bytes(issued.cert_pem)
        return TlsFiles(str(cert_path), str(key_path), str(ca_path))


def write_private(path: Path, data: bytes) -> None:
    """Write `data` readable by its owner only."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def write_stack_pki(folder: Path, names: Iterable[str], hosts: Sequence[str] = DEFAULT_HOSTS
                    ) -> Mapping[str, TlsFiles]:
    """A fresh CA and one certificate per name (services, and e.g. a 'client' for operators)."""
    authority = CertificateAuthority()
    ca_path = authority.write_ca(folder / "ca.crt")
    return {name: authority.write_identity(folder, name, hosts, ca_path) for name in names}
