"""TLS pieces on a real in-process gRPC server (loopback, real certificates): client-side reload
of rotated files, host name verification and its override, half-written rotations, and the
validation of the TLS settings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.channel_factory import ChannelFactory
from services.common.channels import ChannelPool
from services.common.config import parse_settings
from services.common.pki import CertificateAuthority
from services.common.tls import ServerTls, TlsFiles, TlsMaterial, TlsSource, add_port
from services.decode.settings import DecodeSettings
from services.gateway.settings import GatewaySettings
from services.kvstore.settings import KvStoreSettings
from tests.tls_helpers import Pki, health_code, install, presented_serial

WHOAMI = "/test.WhoAmI/Serial"


def _client_serial(_request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """The serial number of the client certificate this call came with."""
    pem = context.auth_context()["x509_pem_cert"][0]
    return str(x509.load_pem_x509_certificate(pem).serial_number).encode()


async def _serve(files: TlsFiles, require_client_cert: bool) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.WhoAmI", {"Serial": grpc.unary_unary_rpc_method_handler(_client_serial)})])
    port = add_port(server, "127.0.0.1:0", ServerTls(TlsSource(files), require_client_cert))
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
async def mtls_server(pki: Pki) -> AsyncIterator[str]:
    server, address = await _serve(pki.files["decode"], require_client_cert=True)
    yield address
    await server.stop(0)


async def _code(address: str, tls: TlsFiles | None) -> grpc.StatusCode:
    """health_code in a thread: the servers run on the test's event loop."""
    return await asyncio.to_thread(health_code, address, tls)


async def _whoami(channel: grpc.aio.Channel) -> int:
    return int(await channel.unary_unary(WHOAMI)(b"", timeout=5))


async def test_channel_pool_presents_the_rotated_client_certificate(pki: Pki, mtls_server: str,
                                                                    tmp_path: Path) -> None:
    identity = pki.authority.write_identity(tmp_path, "rotating-client", ca_path=Path(pki.ca))
    pool = ChannelPool(ChannelFactory(TlsSource(identity), check_interval_seconds=0.0))
    try:
        first = pool.get(mtls_server)
        before = await _whoami(first)
        assert pool.get(mtls_server) is first  # unchanged files: the same channel
        stream = health_pb2_grpc.HealthStub(first).Watch(health_pb2.HealthCheckRequest())
        await stream.read()
        issued = pki.authority.issue("rotating-client")
        install(identity, issued)
        second = pool.get(mtls_server)
        assert second is not first
        assert before != issued.serial and await _whoami(second) == issued.serial
        assert first.get_state() != grpc.ChannelConnectivity.SHUTDOWN  # retired, its stream goes on
        stream.cancel()
        deadline = asyncio.get_running_loop().time() + 10
        while first.get_state() != grpc.ChannelConnectivity.SHUTDOWN:  # closed once its calls ended
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
    finally:
        await pool.close()


async def test_half_written_rotation_keeps_the_previous_material(pki: Pki, tmp_path: Path) -> None:
    identity = pki.authority.write_identity(tmp_path, "half", ca_path=Path(pki.ca))
    source = TlsSource(identity)
    old = source.current
    issued = pki.authority.issue("half")
    Path(identity.key).write_bytes(issued.key_pem)  # the key arrived, the certificate not yet
    assert source.refresh() is old
    Path(identity.cert).write_bytes(issued.cert_pem)
    assert source.refresh().serial == issued.serial


async def test_mutual_tls_refuses_missing_and_foreign_client_certificates(pki: Pki, mtls_server: str) -> None:
    assert await _code(mtls_server, pki.client()) == grpc.StatusCode.OK
    assert await _code(mtls_server, TlsFiles(ca=pki.ca)) == grpc.StatusCode.UNAVAILABLE
    assert await _code(mtls_server, pki.intruder) == grpc.StatusCode.UNAVAILABLE
    assert await _code(mtls_server, None) == grpc.StatusCode.UNAVAILABLE


async def test_host_name_verification_and_its_override(tmp_path: Path) -> None:
    """A certificate naming only a DNS name is refused when dialled by IP, unless the client is
    told which name to verify (--tls-server-name)."""
    authority = CertificateAuthority()
    named = authority.write_identity(tmp_path, "decode", hosts=("decode.internal",))
    server, address = await _serve(named, require_client_cert=False)
    try:
        assert await _code(address, TlsFiles(ca=named.ca)) == grpc.StatusCode.UNAVAILABLE
        assert await _code(address, TlsFiles(ca=named.ca, server_name="wrong.internal")) == grpc.StatusCode.UNAVAILABLE
        by_name = TlsFiles(ca=named.ca, server_name="decode.internal")
        assert await _code(address, by_name) == grpc.StatusCode.OK
        rotated = authority.issue("decode", ("decode.internal",))  # and the server reloads a rotated certificate
        install(named, rotated)
        assert await asyncio.to_thread(presented_serial, address, by_name) == rotated.serial
    finally:
        await server.stop(0)


async def test_one_channel_over_several_tls_servers(pki: Pki, tmp_path: Path) -> None:
    """Several addresses over mutual TLS (a worker's pool of kvstores, the SDK's gateways): every
    server's certificate is verified against the first address's host and the client's is
    presented; a server that stops is passed over."""
    servers = [await _serve(pki.files["kvstore"], require_client_cert=True) for _ in range(2)]
    both = ",".join(address for _, address in servers)
    identity = pki.authority.write_identity(tmp_path, "pool-client", ca_path=Path(pki.ca))
    pool = ChannelPool(ChannelFactory(TlsSource(identity)))
    client_serial = TlsMaterial.read(identity).serial
    try:
        assert [await _whoami(pool.get(both)) for _ in range(4)] == [client_serial] * 4
        assert await _code(both, pki.client()) == grpc.StatusCode.OK  # the SDK's and health check's channel
        await servers[0][0].stop(0)
        assert [await _whoami(pool.get(both)) for _ in range(4)] == [client_serial] * 4
        assert await _code(both, TlsFiles(ca=pki.ca)) == grpc.StatusCode.UNAVAILABLE  # still mutual TLS
    finally:
        await pool.close()
        for server, _ in servers:
            await server.stop(0)


@pytest.mark.parametrize(("cls", "env", "phrase"), [
    (DecodeSettings, {"TLS_CERT": "{cert}"}, "tls_cert and tls_key must be given together"),
    (DecodeSettings, {"TLS_KEY": "{key}"}, "tls_cert and tls_key must be given together"),
    (DecodeSettings, {"TLS_CERT": "{cert}", "TLS_KEY": "/nonexistent.key"}, "tls_key '/nonexistent.key' does not"),
    (KvStoreSettings, {"TLS_CERT": "{cert}", "TLS_KEY": "{key}", "TLS_CA": "/no/ca.crt"}, "tls_ca '/no/ca.crt'"),
    (KvStoreSettings, {"TLS_CERT": "{cert}", "TLS_KEY": "{other_key}"}, "is not the key of tls_cert"),
    (KvStoreSettings, {"TLS_CERT": "{ca}", "TLS_KEY": "{ca}"}, "no unencrypted PEM private key"),
    (GatewaySettings, {"TLS_CA": "{ca}"}, "need tls_cert and tls_key"),
    (GatewaySettings, {"TLS_CERT": "{cert}", "TLS_KEY": "{key}", "TLS_REQUIRE_CLIENT_CERT": "1"}, "needs tls_ca"),
])
def test_bad_tls_settings_raise_value_error(pki: Pki, cls: type, env: dict[str, str], phrase: str) -> None:
    paths = {"cert": pki.files["decode"].cert, "key": pki.files["decode"].key, "ca": pki.ca,
             "other_key": pki.files["prefill"].key}
    with pytest.raises(ValueError, match=phrase):
        parse_settings(cls, "x", "", [], {name: value.format(**paths) for name, value in env.items()})


def test_good_tls_settings(pki: Pki) -> None:
    files = pki.files["gateway"]
    settings = parse_settings(GatewaySettings, "x", "", ["--tls-require-client-cert"], files.environment())
    assert settings.tls_files() == files and settings.server_tls(TlsSource(files)).require_client_cert
    worker = parse_settings(DecodeSettings, "x", "", ["--tls-server-name", "decode.internal"], files.environment())
    assert worker.server_tls(TlsSource(files)).require_client_cert  # internal services: mTLS with a CA
    assert parse_settings(KvStoreSettings, "x", "", [], {}).tls_files() is None
