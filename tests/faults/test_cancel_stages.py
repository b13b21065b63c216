"""A client cancels at every stage of a request's life: queued behind another prompt, prefilling,
transferring (the prefill frozen mid-transfer, so its remaining chunks arrive after the cancel),
decoding, swapped out to the kvstore. Each time nothing is held anywhere afterwards, and the
workers go on serving."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

import grpc

from services.client import GatewayClient
from services.common.pb import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import RunningStack
from tests.faults.conftest import assert_nothing_held
from tests.held import decode_stats, prefill_stats

LONG = "Here is a list of the planets of the solar system and one fact about each of them. " * 30


async def _until(condition: Callable[[], Awaitable[bool]], timeout: float = 60) -> None:
    for _ in range(int(timeout / 0.02)):
        if await condition():
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("the request never reached the stage under test")


def _start(channel: grpc.aio.Channel, prompt: str, max_tokens: int) -> grpc.aio.UnaryStreamCall:
    return gateway_pb2_grpc.GatewayServiceStub(channel).Generate(gateway_pb2.GenerateRequest(
        prompt=prompt, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)),
        timeout=120)


async def _still_serves(stack: RunningStack, gateway: str = "gateway") -> None:
    async with GatewayClient(stack[gateway]) as client:
        assert len((await client.complete("Hello", max_tokens=3, temperature=0, ignore_eos=True,
                                          timeout=120)).token_ids) == 3


async def test_cancel_while_queued_behind_another_prompt(faults) -> None:
    async with grpc.aio.insecure_channel(faults["gateway"]) as channel:
        ahead = _start(channel, LONG, 2)
        await _until(lambda: _active_prefills(faults, 1))
        queued = _start(channel, "Hello there", 2)
        await _until(lambda: _active_prefills(faults, 2))  # admitted, waiting for the model thread
        queued.cancel()
        ahead.cancel()
    await assert_nothing_held(faults)
    await _still_serves(faults)


async def _active_prefills(stack: RunningStack, count: int) -> bool:
    return (await prefill_stats(stack["prefill"])).active_requests == count


async def test_cancel_while_prefilling(faults) -> None:
    async with grpc.aio.insecure_channel(faults["gateway"]) as channel:
        call = _start(channel, LONG, 2)
        await _until(lambda: _active_prefills(faults, 1))
        call.cancel()
    await assert_nothing_held(faults)
    await _still_serves(faults)


async def test_cancel_while_transferring_refuses_the_late_chunks(faults) -> None:
    prefill = faults.stack.processes["prefill"]
    async with grpc.aio.insecure_channel(faults["gateway"]) as channel:
        call = _start(channel, LONG, 2)

        async def sending() -> bool:
            return (await prefill_stats(faults["prefill"])).kv_bytes_held > 0

        await _until(sending)
        prefill.send_signal(signal.SIGSTOP)
        try:
            call.cancel()
            await _until(lambda: _decode_idle(faults, "decode"))  # the decode let go first
        finally:
            prefill.send_signal(signal.SIGCONT)  # now the rest of the transfer arrives, too late
    await assert_nothing_held(faults)
    await _still_serves(faults)


async def _decode_idle(stack: RunningStack, name: str) -> bool:
    stats = await decode_stats(stack[name])
    return (stats.active_requests, stats.blocks_used) == (0, 0)


async def test_cancel_while_decoding(faults) -> None:
    async with grpc.aio.insecure_channel(faults["gateway"]) as channel:
        call = _start(channel, "Tell me a long story about a dragon.", 300)
        for _ in range(5):
            await call.read()
        call.cancel()
    await assert_nothing_held(faults)
    await _still_serves(faults)


async def test_cancel_while_swapped_out(faults) -> None:
    before = (await decode_stats(faults["decode_small"])).preemptions_total
    async with grpc.aio.insecure_channel(faults["gateway_small"]) as channel:
        older = _start(channel, "One two three four five six seven", 180)
        await older.read()
        newer = _start(channel, "Eight nine ten eleven twelve", 180)
        await newer.read()

        async def swapped() -> bool:
            stats = await decode_stats(faults["decode_small"])
            return stats.preemptions_total > before and stats.running == 1

        await _until(swapped)
        newer.cancel()
        older.cancel()
    await assert_nothing_held(faults)
    await _still_serves(faults, "gateway_small")
