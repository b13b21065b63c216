"""Workers that die or freeze mid-request: the client gets exactly Hugging Face's output (another
worker finishes the request), and nothing is held anywhere afterwards."""

from __future__ import annotations

import asyncio
import signal

import grpc

from services.client import GatewayClient
from services.common.pb import common_pb2, decode_pb2_grpc
from tests.conftest import RunningStack, busy_decode
from tests.faults.conftest import PREFILLS, assert_nothing_held, restart
from tests.held import transferring_prefill

SHORT = "Once upon a time, in a small village,"
LONG = "Here is a list of the planets of the solar system and one fact about each of them. " * 30


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
                victim = await busy_decode(faults, "gateway_pair", ("decode", "decode2"))
                faults.stack.processes[victim].send_signal(signal.SIGKILL)
    assert tokens == expected
    survivor = "decode2" if victim == "decode" else "decode"
    assert await _requests_total(faults[survivor]) == before[survivor] + 1  # the other worker took it
    restart(faults, victim)
    await assert_nothing_held(faults)


async def _hit_prefill_mid_transfer(faults: RunningStack, sig: signal.Signals) -> tuple[list[int], str]:
    """Send LONG; once a prefill worker is sending its KV, send it `sig`. The tokens and the victim
    (a frozen victim is thawed once the request is done: its late chunks are then refused)."""
    async with GatewayClient(faults["gateway_pair"]) as client:
        request = asyncio.ensure_future(client.complete(LONG, max_tokens=6, temperature=0, timeout=120))
        victim = await transferring_prefill(faults, PREFILLS)
        faults.stack.processes[victim].send_signal(sig)
        try:
            return (await request).token_ids, victim
        finally:
            if sig == signal.SIGSTOP:
                faults.stack.processes[victim].send_signal(signal.SIGCONT)


async def test_prefill_killed_mid_transfer_is_retried_on_the_other_prefill(faults, runtime, encoder) -> None:
    tokens, victim = await _hit_prefill_mid_transfer(faults, signal.SIGKILL)
    assert tokens == runtime.reference_generate(encoder.encode_text(LONG), 6)
    restart(faults, victim)
    await assert_nothing_held(faults)


async def test_frozen_prefill_is_given_up_after_its_deadline_and_retried(faults, runtime, encoder) -> None:
    tokens, _ = await _hit_prefill_mid_transfer(faults, signal.SIGSTOP)
    assert tokens == runtime.reference_generate(encoder.encode_text(LONG), 6)
    await assert_nothing_held(faults)
    async with GatewayClient(faults["gateway_pair"]) as client:  # the thawed worker serves again
        for _ in range(2):
            assert (await client.complete(SHORT, max_tokens=4, temperature=0, timeout=120)).token_ids == \
                runtime.reference_generate(encoder.encode_text(SHORT), 4)
    await assert_nothing_held(faults)
