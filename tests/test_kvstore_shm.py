"""The shm kvstore backend under the whole stack: greedy output equals Hugging Face `generate` when
the KV goes through shared memory (the kvstore transfer path, the prefill's checkpoint copy, and a
preempted sequence swapped out and back in), the decode reading it from the segments (descriptor
Gets), and no segment outlives the requests."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest

from services.client import GatewayClient, GatewayError
from services.common import shm
from services.common.pb import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from services.common.runtime import ModelRuntime
from services.gateway.text import PromptEncoder
from tests.conftest import (
    PROMPTS,
    RunningStack,
    prompt_encoder,
    start_stack,
)
from tests.held import decode_stats, wait_decode_idle

PREFIX = f"kv-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def shm_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """Tiny model; kvstore on shared memory; the prefill checkpoints every transfer to it; a small
    decode pool (5 blocks of 16 tokens) so that three concurrent requests preempt and swap."""
    running = start_stack(tmp_path_factory.mktemp("shm-stack"), "tiny", "shm",
                          extra={"kvstore": ("--shm-prefix", PREFIX),
                                 "prefill": ("--checkpoint-kv", "--kv-chunk-tokens", "4"),
                                 "decode": ("--kv-pool-blocks", "5", "--block-size", "16")},
                          extra_gateways={"gateway_kvstore": ("--kv-transfer", "kvstore")})
    yield running
    running.stack.stop()
    assert shm.segments_of(PREFIX) == []


@pytest.fixture(scope="module")
def tiny_encoder() -> PromptEncoder:
    return prompt_encoder("tiny")


async def _kvstore_stats(address: str) -> kvstore_pb2.KvStoreStats:
    async with grpc.aio.insecure_channel(address) as channel:
        return await kvstore_pb2_grpc.KvStoreServiceStub(channel).Stats(common_pb2.StatsRequest(), timeout=10)


async def _wait_store_empty(address: str, seconds: float = 10.0) -> kvstore_pb2.KvStoreStats:
    """The decode deletes a request's keys once it ends: wait for that."""
    deadline = time.monotonic() + seconds
    while (stats := await _kvstore_stats(address)).entries and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return stats


@pytest.mark.parametrize("gateway", ["gateway", "gateway_kvstore"], ids=["checkpoint", "via-kvstore"])
async def test_greedy_output_through_the_shm_kvstore_equals_hf_generate(
        shm_stack: RunningStack, gateway: str, tiny: ModelRuntime, tiny_encoder: PromptEncoder) -> None:
    before = await _kvstore_stats(shm_stack["kvstore"])
    async with GatewayClient(shm_stack[gateway]) as client:
        for prompt in PROMPTS[:2]:
            result = await client.complete(prompt, max_tokens=12, temperature=0)
            assert result.token_ids == tiny.reference_generate(tiny_encoder.encode_text(prompt), 12), prompt
    after = await _wait_store_empty(shm_stack["kvstore"])
    assert after.backend == "shm" and after.entries == 0
    assert shm.segments_of(PREFIX) == []  # every value's segment unlinked with it
    if gateway == "gateway_kvstore":  # the decode read every chunk from shared memory
        assert after.shm_gets_total - before.shm_gets_total >= 2 * 3  # layout, end, >= 1 chunk each


async def test_preempted_sequences_swap_through_shared_memory_exactly(
        shm_stack: RunningStack, tiny: ModelRuntime, tiny_encoder: PromptEncoder) -> None:
    prompts = PROMPTS[:3]  # 3 x (~8 + 32) tokens need 9 blocks: more than the pool's 5
    expected = [tiny.reference_generate(tiny_encoder.encode_text(p), 32) for p in prompts]
    before_gets = (await _kvstore_stats(shm_stack["kvstore"])).shm_gets_total
    before = (await decode_stats(shm_stack["decode"])).preemptions_total
    async with GatewayClient(shm_stack["gateway"]) as client:
        outputs = await asyncio.gather(*(client.complete(p, max_tokens=32, temperature=0, ignore_eos=True)
                                         for p in prompts), return_exceptions=True)
    for prompt, output, reference in zip(prompts, outputs, expected):
        if isinstance(output, GatewayError):  # admission may be refused while the pool is nearly full
            assert output.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            continue
        assert output.token_ids == reference, prompt
    stats = await wait_decode_idle(shm_stack["decode"])
    assert stats.preemptions_total > before and stats.blocks_used == 0
    assert (await _wait_store_empty(shm_stack["kvstore"])).shm_gets_total > before_gets  # swapped back in
    assert shm.segments_of(PREFIX) == []
