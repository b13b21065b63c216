"""The gateway's own health follows its workers: started before them it is NOT_SERVING (and
Generate says which role is missing), SERVING once a worker of each role it needs is (a unified
gateway needs no prefill worker), the SDK's first request then succeeds, and it turns NOT_SERVING
again when its workers are gone."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from services.client import GatewayClient, GatewayError, RetryPolicy
from services.common.healthcheck import health_status
from services.stack import ServiceSpec, Stack, free_port
from tests.membership_helpers import NOT_SERVING, SERVING, gateway_spec, start, wait_serving, worker_spec


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, ServiceSpec]]]:
    prefill, decode = worker_spec("prefill", "prefill"), worker_spec("decode", "decode")
    specs = {"prefill": prefill, "decode": decode,
             "gateway": gateway_spec("gateway", "--prefill-addresses", prefill.address,
                                     "--decode-addresses", decode.address, "--http-port", str(free_port())),
             "unified": gateway_spec("unified", "--prefill-mode", "unified", "--decode-addresses", decode.address)}
    running = Stack([specs["gateway"], specs["unified"]], log_dir=str(tmp_path_factory.mktemp("readiness")))
    running.start()  # the gateways only; the workers come later
    yield running, specs
    running.stop()


def _health(spec: ServiceSpec) -> int:
    return health_status(spec.address, timeout=0.5)


def _http_health(spec: ServiceSpec) -> int:
    port = spec.args[spec.args.index("--http-port", spec.args.index("--http-port") + 1) + 1]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


async def _refusal(spec: ServiceSpec) -> str:
    async with GatewayClient(spec.address, retry=RetryPolicy(max_retries=0)) as client:
        with pytest.raises(GatewayError) as refused:
            await client.complete("Hello", max_tokens=2, timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    return refused.value.details()


async def _until_refused_with(spec: ServiceSpec, phrase: str, timeout: float = 60) -> None:
    """Past the gateway's own start-up (tokenizer), it refuses naming the missing role."""
    deadline = time.monotonic() + timeout
    while phrase not in (details := await _refusal(spec)):
        assert time.monotonic() < deadline, details
        await asyncio.sleep(0.2)


async def _until_health(spec: ServiceSpec, status: int, timeout: float) -> float:
    started = time.monotonic()
    while await asyncio.to_thread(_health, spec) != status:
        assert time.monotonic() - started < timeout, f"{spec.name} not {status} after {timeout}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_gateway_serves_only_once_its_workers_serve(stack: tuple[Stack, dict[str, ServiceSpec]]) -> None:
    running, specs = stack
    await _until_refused_with(specs["gateway"], "no decode worker is serving")
    await _until_refused_with(specs["unified"], "no decode worker is serving")
    assert await asyncio.to_thread(_health, specs["gateway"]) == NOT_SERVING
    assert await asyncio.to_thread(_health, specs["unified"]) == NOT_SERVING
    assert await asyncio.to_thread(_http_health, specs["gateway"]) == 503
    # Not ready, yet alive: Kubernetes' liveness probe asks this name and must not restart it.
    assert await asyncio.to_thread(health_status, specs["gateway"].address, 0.5, None, "liveness") == SERVING
    decode = start(running, specs["decode"])
    await asyncio.to_thread(wait_serving, specs["decode"], decode)
    assert await _until_health(specs["unified"], SERVING, 5) < 2.0
    await _until_refused_with(specs["gateway"], "no prefill worker is serving")
    assert await asyncio.to_thread(_health, specs["gateway"]) == NOT_SERVING
    prefill = start(running, specs["prefill"])
    await asyncio.to_thread(wait_serving, specs["prefill"], prefill)
    assert await _until_health(specs["gateway"], SERVING, 5) < 2.0
    assert await asyncio.to_thread(_http_health, specs["gateway"]) == 200
    for name in ("gateway", "unified"):  # the SDK's first request succeeds, with its default retries
        async with GatewayClient(specs[name].address) as client:
            completion = await client.complete("The capital of France is", max_tokens=4, ignore_eos=True,
                                               timeout=30)
        assert len(completion.token_ids) == 4


async def test_gateway_is_not_serving_again_when_its_workers_are_gone(
        stack: tuple[Stack, dict[str, ServiceSpec]]) -> None:
    running, specs = stack
    running.processes["decode"].send_signal(signal.SIGKILL)
    for name in ("gateway", "unified"):
        assert await _until_health(specs[name], NOT_SERVING, 5) < 2.0
        assert "no decode worker is serving (1 unreachable)" in await _refusal(specs[name])
    running.processes["decode"].wait(10)
