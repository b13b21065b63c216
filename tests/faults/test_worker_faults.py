"""Workers that die or freeze mid-request: the client gets exactly Hugging Face's output (another
worker finishes the request), and nothing is held anywhere afterwards."""

from __future__ import annotations

import asyncio
import signal

import grpc

from services.client import GatewayClient
from services.common.pb import common_pb2, decode_pb2_grpc, gateway_pb2_grpc
from tests.conftest import RunningStack
from tests.faults.conftest import PREFILLS, assert_nothing_held, restart
from tests.held import transferring_prefill

SHORT = "Once upon a time, in a small village,"
LONG = "Here is a list of the planets of the solar system and one fact about each of them. " * 30


async def _busy_decode(stack: RunningStack) -> str:
    async with grpc.aio.insecure_channel(stack["gateway_pair"]) as channel:
        stats = await gateway_pb2_grpc.GatewayServiceStub(channel).Stats(common_pb2.StatsRequest())
    busy = [w.address for w in stats.workers if w.role == "decode" and w.active_requests]
    assert len(busy) == 1, stats
    return "decode" if busy[0] == stack["decode"] else "decode2"


async def _requests_total(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        return (await decode_pb2_grpc.DecodeServiceStub(channel).Stats(common_pb2.StatsRequest())).requests_total


async def test_decode_killed_mid_stream_is_finished_by_the_other_decode(faults, runtime, encoder) -> None:
    expected = runtime.reference_generate(encoder.encode_text(SHORT), 40)
    before = {name: await _requests_total(faults[name]) for name in ("decode", "decode2")}
    tokens: list[int] = []
    async with GatewayClient(faults["gateway_pair"]) as client:
        async for chunk in client.generate(SHORT, max_tokens=40, temperature=0, timeout=120):
            tokens += chunk.token_ids
            if len(tokens) == 8:
                victim = await _busy_decode(faults)
                faults.stack.processes[victim].send_signal(signal.SIGKILL)
    assert tokens == expected
    survivor = "decode2" if victim == "decode" else "decode"
    assert await _requests_total(faults[survivor]) == before[survivor] + 1  # the other worker took it
    restart(faults, victim)
    await assert_nothing_held(faults)


async def test_prefill_killed_mid_transfer_is_retried_on_the_other_prefill(faults, runtime, encoder) -> None:
    expected = runtime.reference_generate(encoder.encode_text(LONG), 6)
    async with GatewayClient(faults["gateway_pair"]) as client:
        request = asyncio.ensure_future(client.complete(LONG, max_tokens=6, temperature=0, timeout=120))
        victim = await transferring_prefill(faults, PREFILLS)
        faults.stack.processes[victim].send_signal(signal.SIGKILL)
        result = await request
    assert result.token_ids == expected
    restart(faults, victim)
    await assert_nothing_held(faults)


async def test_frozen_prefill_is_given_up_after_its_deadline_and_retried(faults, runtime, encoder) -> None:
    expected = runtime.reference_generate(encoder.encode_text(LONG), 6)
    async with GatewayClient(faults["gateway_pair"]) as client:
        request = asyncio.ensure_future(client.complete(LONG, max_tokens=6, temperature=0, timeout=120))
        victim = await transferring_prefill(faults, PREFILLS)
        faults.stack.processes[victim].send_signal(signal.SIGSTOP)
        try:
            result = await request
        finally:
            faults.stack.processes[victim].send_signal(signal.SIGCONT)  # its late chunks are refused
    assert result.token_ids == expected
    await assert_nothing_held(faults)
    async with GatewayClient(faults["gateway_pair"]) as client:  # the thawed worker serves again
        for _ in range(2):
            assert (await client.complete(SHORT, max_tokens=4, temperature=0, timeout=120)).token_ids == \
                runtime.reference_generate(encoder.encode_text(SHORT), 4)
    await assert_nothing_held(faults)
