"""Rolling restart under load: with two of every service (tests/cluster/rolling.py) and the serving
benchmark keeping 4 requests in flight across both gateways, every instance is restarted in turn
(SIGTERM, exit 0, started again, back in rotation; then the next) and not one request fails.
Drains lose nothing: a request in flight on a gateway that got SIGTERM finishes there, and new
ones go to the other gateway."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator

import pytest

from services.client import GatewayClient, RetryPolicy
from services.common.runtime import ModelRuntime
from services.gateway.text import PromptEncoder
from services.stack import Stack
from tests.cluster.rolling import ROLES, SERVICES, Pairs, calls_served, restart, specs, start_bench, stop_bench
from tests.conftest import start_healthy
from tests.held import assert_nothing_held
from tests.membership_helpers import stop_gracefully, wait_serving
from tests.redis_server import RedisServer

NO_RETRY = RetryPolicy(max_retries=0)  # what must not fail does not get a second chance


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pairs]:
    log_dir = tmp_path_factory.mktemp("rolling")
    redis = RedisServer(log_dir)
    redis.start()
    stack = Stack(specs(redis.url), log_dir=str(log_dir))
    try:
        start_healthy(stack, log_dir)
        yield Pairs(stack, log_dir)
    finally:
        stack.stop()
        redis.stop()


async def test_in_flight_request_finishes_on_a_draining_gateway_and_new_ones_go_to_the_other(
        pairs: Pairs, tiny_runtime: ModelRuntime, tiny_encoder: PromptEncoder) -> None:
    prompt = "Once upon a time, in a small village,"
    expected = tiny_runtime.reference_generate(tiny_encoder.encode_text(prompt), 150)
    short = tiny_runtime.reference_generate(tiny_encoder.encode_text("The capital of France is"), 4)
    second = pairs.spec("gateway2")
    before = await asyncio.to_thread(calls_served, second, "Generate")
    async with GatewayClient(pairs["gateway"], retry=NO_RETRY) as first_only:
        stream = first_only.generate(prompt, max_tokens=150, temperature=0, timeout=120)
        tokens = list((await anext(stream)).token_ids)
        pairs.stack.processes["gateway"].send_signal(signal.SIGTERM)
        async with GatewayClient(f"{pairs['gateway']},{pairs['gateway2']}", retry=NO_RETRY) as both:
            for _ in range(4):  # never sent to the draining gateway: its health says NOT_SERVING
                result = await both.complete("The capital of France is", max_tokens=4, temperature=0, timeout=60)
                assert result.token_ids == short
        async for chunk in stream:  # the draining gateway finishes what it has
            tokens += chunk.token_ids
    assert tokens == expected
    assert await asyncio.to_thread(calls_served, second, "Generate") == before + 4
    await asyncio.to_thread(stop_gracefully, pairs.stack, "gateway")  # drained, exit 0
    process = pairs.stack.start_one(pairs.spec("gateway"))
    await asyncio.to_thread(wait_serving, pairs.spec("gateway"), process, 120)


async def test_rolling_restart_under_load_loses_no_request(pairs: Pairs) -> None:
    bench = start_bench(f"{pairs['gateway']},{pairs['gateway2']}", 600, pairs.log_dir / "bench.log")
    try:
        await asyncio.sleep(3)  # steady traffic first
        for role in ("kvstore", "prefill", "decode", "gateway"):
            for name in ROLES[role]:
                await restart(pairs.stack, name)
        await asyncio.sleep(2)
        assert bench.poll() is None, "the bench ended before the restarts did"
        run = await asyncio.to_thread(stop_bench, bench)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    (pairs.log_dir / "bench.json").write_text(json.dumps(run, indent=2))
    print(json.dumps({key: run[key] for key in ("requests", "completed", "failed", "duration_s", "e2e_s",
                                                "ttft_s", "errors")}))
    assert run["failed"] == 0, run["errors"]
    assert run["completed"] >= 50, run
    await assert_nothing_held(pairs, SERVICES)
