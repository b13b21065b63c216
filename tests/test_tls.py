"""The whole stack on TLS (tiny model): the SDK and the HTTP API over TLS, mutual TLS between the
services, plaintext and foreign certificates refused, certificates rotated without a restart, and
the health-check module against TLS servers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from services.bench.__main__ import main as bench_main
from services.client import GatewayClient, GatewayError, SyncGatewayClient
from services.common.tls import TlsFiles
from services.stack import free_port
from tests.conftest import RunningStack, start_stack
from tests.tls_helpers import Pki, health_code, install, no_client_cert, presented_serial

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"
INTERNAL = ("prefill", "decode", "kvstore")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("stack-pki"))


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[RunningStack]:
    """Every service with its own certificate; a second gateway also requires client certificates."""
    strict_http = free_port()
    running = start_stack(tmp_path_factory.mktemp("tls-stack"), "tiny", tls=pki.files,
                          extra_gateways={"gateway_strict": ("--tls-require-client-cert", "--http-port",
                                                             str(strict_http))})
    running.addresses["http_strict"] = f"https://127.0.0.1:{strict_http}"
    yield running
    running.stack.stop()


async def test_sdk_generates_over_tls_without_a_client_certificate(tls_stack: RunningStack, pki: Pki) -> None:
    async with GatewayClient(tls_stack["gateway"], tls_ca=pki.ca, timeout_seconds=60) as client:
        result = await client.complete(PROMPT, max_tokens=4, temperature=0, ignore_eos=True)
    assert result.usage is not None and result.usage.completion_tokens == 4
    with SyncGatewayClient(tls_stack["gateway"], tls_ca=pki.ca, timeout_seconds=60) as sync_client:
        assert sync_client.complete(PROMPT, max_tokens=4, temperature=0, ignore_eos=True).token_ids == \
            result.token_ids


def test_http_api_over_https(tls_stack: RunningStack, pki: Pki) -> None:
    body = {"model": "tiny-random-llama", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    with httpx.Client(verify=TlsFiles(ca=pki.ca).ssl_context(), timeout=60) as client:
        assert client.get(tls_stack["http"] + "/v1/models").status_code == 200
        response = client.post(tls_stack["http"] + "/v1/completions", json=body)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(tls_stack["http"] + "/v1/models", timeout=10)  # the system's roots do not know our CA
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_stack["http"].replace("https:", "http:") + "/v1/models", timeout=10)  # plaintext


@pytest.mark.parametrize("service", ["gateway", "decode"])
def test_plaintext_clients_are_refused(tls_stack: RunningStack, service: str) -> None:
    assert health_code(tls_stack[service], None) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", INTERNAL)
def test_internal_services_require_a_client_certificate_of_their_ca(tls_stack: RunningStack, pki: Pki,
                                                                   service: str) -> None:
    assert health_code(tls_stack[service], no_client_cert(pki.client())) == grpc.StatusCode.UNAVAILABLE
    assert health_code(tls_stack[service], pki.intruder) == grpc.StatusCode.UNAVAILABLE
    assert health_code(tls_stack[service], pki.client()) == grpc.StatusCode.OK


def test_gateway_can_require_client_certificates_too(tls_stack: RunningStack, pki: Pki) -> None:
    assert health_code(tls_stack["gateway"], no_client_cert(pki.client())) == grpc.StatusCode.OK
    assert health_code(tls_stack["gateway_strict"], no_client_cert(pki.client())) == grpc.StatusCode.UNAVAILABLE
    with SyncGatewayClient(tls_stack["gateway_strict"], tls_ca=pki.ca, tls_cert=pki.files["client"].cert,
                           tls_key=pki.files["client"].key, timeout_seconds=60) as client:
        assert len(client.complete(PROMPT, max_tokens=2, temperature=0, ignore_eos=True).token_ids) == 2
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_stack["http_strict"] + "/v1/models", verify=TlsFiles(ca=pki.ca).ssl_context(), timeout=10)
    assert httpx.get(tls_stack["http_strict"] + "/v1/models", verify=pki.client().ssl_context(),
                     timeout=10).status_code == 200


def _wait_for_serial(address: str, client: TlsFiles, serial: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := presented_serial(address, client)) != serial:
        assert time.monotonic() < deadline, f"{address} still presents serial {seen:x}, not {serial:x}"
        time.sleep(0.2)


@pytest.mark.parametrize("service", ["decode", "kvstore", "gateway", "http"])
def test_rotated_certificates_are_served_without_a_restart(tls_stack: RunningStack, pki: Pki, service: str) -> None:
    address = tls_stack[service].removeprefix("https://")
    owner = "gateway" if service == "http" else service
    before = presented_serial(address, pki.client())
    rotated = pki.authority.issue(f"{owner}-rotated")
    install(pki.files[owner], rotated)
    _wait_for_serial(address, pki.client(), rotated.serial)
    assert before != rotated.serial
    processes = tls_stack.stack.processes
    assert all(processes[name].poll() is None for name in (*INTERNAL, "gateway"))  # nothing restarted
    with SyncGatewayClient(tls_stack["gateway"], tls_ca=pki.ca, timeout_seconds=60) as client:
        assert len(client.complete(PROMPT, max_tokens=3, temperature=0, ignore_eos=True).token_ids) == 3


def _healthcheck(address: str, env: dict[str, str], *flags: str) -> int:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("TLS_")} | env
    return subprocess.run([sys.executable, "-m", "services.common.healthcheck", address, *flags], cwd=ROOT,
                          env=environ, capture_output=True, timeout=60).returncode


def test_healthcheck_module_against_tls_servers(tls_stack: RunningStack, pki: Pki) -> None:
    decode = pki.files["decode"]
    assert _healthcheck(tls_stack["decode"], decode.environment()) == 0  # a probe in decode's container
    assert _healthcheck(tls_stack["gateway"], {}, "--tls-ca", pki.ca) == 0
    assert _healthcheck(tls_stack["decode"], {}, "--tls-ca", pki.ca) == 1  # no client certificate
    assert _healthcheck(tls_stack["decode"], {}) == 1  # plaintext
    assert _healthcheck(tls_stack["decode"], decode.environment(), "--tls-server-name", "elsewhere.example") == 1


async def test_sdk_reports_an_untrusted_gateway_as_unavailable(tls_stack: RunningStack) -> None:
    async with GatewayClient(tls_stack["gateway"], tls=True, timeout_seconds=10) as client:  # system roots
        with pytest.raises(GatewayError) as caught:
            await asyncio.wait_for(client.model_info(), 30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("target", ["--grpc", "--openai-url"])
def test_bench_over_tls(tls_stack: RunningStack, pki: Pki, capsys: pytest.CaptureFixture[str], target: str) -> None:
    where = tls_stack["gateway"] if target == "--grpc" else tls_stack["http"] + "/v1"
    bench_main([target, where, "--model", "tiny-random-llama", "--tls-ca", pki.ca, "--json", "--warmup", "0",
                "--prompt-tokens", "4", "--output-tokens", "3", "--num-requests", "2", "--concurrency", "2"])
    run = json.loads(capsys.readouterr().out)["runs"][0]
    assert run["completed"] == 2 and run["failed"] == 0, run
