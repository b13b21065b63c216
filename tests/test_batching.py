"""Continuous batching over the paged KV pool: exact greedy output for concurrent requests that
join at different times, pool usage back to zero, the three prefill modes agreeing, pool
exhaustion handled with RESOURCE_EXHAUSTED, and preemption that does not change the output."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.client import GatewayClient, GatewayError
from services.common.pb import common_pb2, prefill_pb2_grpc
from tests.conftest import RunningStack, start_stack
from tests.held import decode_stats, wait_decode_idle

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
    "Once upon a time, in a small village,", "The three primary colors are", "Hello, my name is",
    "import numpy as np\n", "The best way to learn a language is", "In 1492, Columbus",
    "The mitochondria is", "SELECT * FROM users WHERE", "My favourite recipe for pancakes:",
    "The speed of light is", "To be or not to be,", "Photosynthesis converts", "A haiku about the sea:\n",
]


class PeakBatch:
    """Watches a decode worker's running batch and keeps its largest size."""

    def __init__(self, address: str) -> None:
        self.running = 0
        self._task = asyncio.ensure_future(self._watch(address))

    async def _watch(self, address: str) -> None:
        while True:
            self.running = max(self.running, (await decode_stats(address)).running)
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        self._task.cancel()


@pytest.fixture(scope="module")
def references(runtime, encoder) -> dict[tuple[str, int], list[int]]:
    return {(prompt, 8 + 2 * i): runtime.reference_generate(encoder.encode_text(prompt), 8 + 2 * i)
            for i, prompt in enumerate(PROMPTS)}


async def test_sixteen_staggered_requests_are_exact_and_batched(memory_stack: RunningStack, references) -> None:

    async def one(index: int, prompt: str, max_tokens: int) -> list[int]:
        await asyncio.sleep(0.15 * index)  # join while the others run
        return (await client.complete(prompt, max_tokens=max_tokens, temperature=0)).token_ids

    peak = PeakBatch(memory_stack["decode"])
    async with GatewayClient(memory_stack["gateway"]) as client:
        outputs = await asyncio.gather(*(one(i, prompt, tokens) for i, (prompt, tokens) in enumerate(references)))
    peak.stop()
    for (key, expected), output in zip(references.items(), outputs):
        assert output == expected, key
    assert peak.running > 1
    stats = await wait_decode_idle(memory_stack["decode"])
    assert (stats.active_requests, stats.blocks_used) == (0, 0) and stats.blocks_total > 0


MORE_PROMPTS = PROMPTS + [
    "The largest ocean on Earth is", "Rain falls because", "A good password should", "The recipe calls for",
    "In the year 3000,", "My cat likes to", "The train leaves at", "Shakespeare wrote",
]


async def test_twenty_four_simultaneous_greedy_requests_equal_hf_generate(memory_stack: RunningStack, runtime,
                                                                          encoder) -> None:
    """The default batch allows 64 sequences a step; matrix products over many rows round
    differently from one row (and batched steps run on packed weights), so large batches must still
    give exactly HF's tokens. Each request lives long enough (64 tokens) for the later prompts'
    prefills to join it: with 16 tokens, packed steps finished requests before 8 were running, and
    with 40 the batch peaked at 15 once on a faster CPU (Zen 5, ~20 ms steps)."""
    expected = [runtime.reference_generate(encoder.encode_text(p), 64) for p in MORE_PROMPTS]

    peak = PeakBatch(memory_stack["decode"])
    async with GatewayClient(memory_stack["gateway"]) as client:
        outputs = await asyncio.gather(*(client.complete(p, max_tokens=64, temperature=0,
                                                         timeout=300) for p in MORE_PROMPTS))
    peak.stop()
    assert peak.running >= 16
    mismatched = [p for p, out, ref in zip(MORE_PROMPTS, outputs, expected) if out.token_ids != ref]
    assert mismatched == []
    assert (await wait_decode_idle(memory_stack["decode"])).blocks_used == 0


@pytest.mark.parametrize("gateway", ["gateway_unified", "gateway_conditional", "gateway_adaptive", "gateway"])
async def test_prefill_modes_give_identical_output(memory_stack: RunningStack, references, gateway: str) -> None:
    async with GatewayClient(memory_stack[gateway]) as client:
        for prompt, tokens in list(references)[:5]:  # prompts of 5 to 10 tokens: conditional mixes both paths
            assert (await client.complete(prompt, max_tokens=tokens, temperature=0)).token_ids == \
                references[(prompt, tokens)]
    stats = await wait_decode_idle(memory_stack["decode"])
    assert stats.blocks_used == 0


@pytest.fixture(scope="module")
def small_pool_stack(tmp_path_factory: pytest.TempPathFactory) -> RunningStack:
    """Real model; the decode pool holds 12 blocks of 16 tokens; preempted KV swaps to the kvstore;
    prompts over 32 tokens are prefilled in chunks of 32."""
    running = start_stack(tmp_path_factory.mktemp("small-pool"), "default",
                          extra={"decode": ("--kv-pool-blocks", "12", "--block-size", "16"),
                                 "prefill": ("--kv-chunk-tokens", "16", "--prefill-chunk-tokens", "32")})
    yield running
    running.stack.stop()


async def test_preemption_keeps_greedy_output(small_pool_stack: RunningStack, runtime, encoder) -> None:
    prompts = PROMPTS[:4]  # 4 x (~8 + 60) tokens need ~20 blocks: more than the pool's 12
    expected = [runtime.reference_generate(encoder.encode_text(p), 60) for p in prompts]
    before = (await decode_stats(small_pool_stack["decode"])).preemptions_total
    async with GatewayClient(small_pool_stack["gateway"]) as client:
        outputs = await asyncio.gather(*(client.complete(p, max_tokens=60, temperature=0, ignore_eos=True)
                                         for p in prompts), return_exceptions=True)
    for prompt, output, reference in zip(prompts, outputs, expected):
        if isinstance(output, GatewayError):  # admission may be refused while the pool is nearly full
            assert output.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            continue
        assert output.token_ids[: len(reference)] == reference, prompt
    assert sum(not isinstance(output, GatewayError) for output in outputs) >= 2, outputs
    stats = await wait_decode_idle(small_pool_stack["decode"])
    assert stats.preemptions_total > before
    assert stats.blocks_used == 0


async def test_pool_exhaustion_completes_or_refuses(small_pool_stack: RunningStack, runtime, encoder) -> None:
    prompts = PROMPTS[:12]
    async with GatewayClient(small_pool_stack["gateway"]) as client:
        outputs = await asyncio.gather(*(client.complete(p, max_tokens=30, temperature=0) for p in prompts),
                                       return_exceptions=True)
    refused = 0
    for prompt, output in zip(prompts, outputs):
        if isinstance(output, GatewayError):
            assert output.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, output
            refused += 1
        else:
            assert output.token_ids == runtime.reference_generate(encoder.encode_text(prompt), 30), prompt
    assert refused < len(prompts)
    assert (await wait_decode_idle(small_pool_stack["decode"])).blocks_used == 0


async def test_chunked_prefill_of_a_long_prompt(small_pool_stack: RunningStack, runtime, encoder) -> None:
    prompt = "Here is a list of the planets of the solar system and one fact about each of them: " * 4
    prompt_ids = encoder.encode_text(prompt)
    assert 64 < len(prompt_ids) < 150  # three or more forward chunks of 32 tokens
    async with GatewayClient(small_pool_stack["gateway"]) as client:
        result = await client.complete(prompt, max_tokens=12, temperature=0)
    assert result.token_ids == runtime.reference_generate(prompt_ids, 12)
    assert (await wait_decode_idle(small_pool_stack["decode"])).blocks_used == 0


async def test_request_over_its_kv_budget_yields_to_others(memory_stack: RunningStack, runtime, encoder) -> None:
    before = (await decode_stats(memory_stack["decode"])).preemptions_total
    long_prompt, short_prompt = PROMPTS[3], PROMPTS[4]
    expected_long = runtime.reference_generate(encoder.encode_text(long_prompt), 40)
    expected_short = runtime.reference_generate(encoder.encode_text(short_prompt), 12)

    async def later() -> list[int]:
        await asyncio.sleep(0.5)  # joins while the budgeted request is running
        return (await client.complete(short_prompt, max_tokens=12, temperature=0)).token_ids

    async with GatewayClient(memory_stack["gateway"]) as client:
        budgeted, normal = await asyncio.gather(
            client.complete(long_prompt, max_tokens=40, temperature=0, ignore_eos=True, max_cache_budget_mb=0.5),
            later())
    assert budgeted.token_ids == expected_long  # swapped out and back in, bit for bit
    assert normal == expected_short
    stats = await wait_decode_idle(memory_stack["decode"])
    assert stats.preemptions_total > before and stats.blocks_used == 0


@pytest.fixture(scope="module")
def batching_prefill_stack(tmp_path_factory: pytest.TempPathFactory) -> RunningStack:
    """Tiny model; the prefill batches prompts for up to 300 ms and 4,096 tokens."""
    running = start_stack(tmp_path_factory.mktemp("prefill-batch"), "tiny",
                          extra={"prefill": ("--prefill-batch-tokens", "4096", "--prefill-batch-wait-ms", "300")})
    yield running
    running.stack.stop()


async def test_prefill_batches_queued_prompts(batching_prefill_stack: RunningStack) -> None:
    from tests.test_observability import _scrape

    port = batching_prefill_stack.metrics_ports["prefill"]
    before = _scrape(port)
    async with GatewayClient(batching_prefill_stack["gateway"]) as client:
        results = await asyncio.gather(*(client.complete(p, max_tokens=6, temperature=0, ignore_eos=True)
                                         for p in PROMPTS[:4]))
        alone = await client.complete(PROMPTS[0], max_tokens=6, temperature=0, ignore_eos=True)
    assert [len(r.token_ids) for r in results] == [6, 6, 6, 6] and len(alone.token_ids) == 6
    after = _scrape(port)
    batches = after["disagg_prefill_batch_size_count"] - before["disagg_prefill_batch_size_count"]
    prompts = after["disagg_prefill_batch_size_sum"] - before["disagg_prefill_batch_size_sum"]
    assert prompts == 5 and batches < 5  # the four concurrent prompts shared forward passes
    assert (await wait_decode_idle(batching_prefill_stack["decode"])).blocks_used == 0


async def test_a_chunked_prefill_reuses_whole_cached_chunks_and_answers_the_same(small_pool_stack: RunningStack,
                                                                                 runtime, encoder) -> None:
    """A prompt longer than --prefill-chunk-tokens (32) resumes after its cached chunks: the cached
    KV is sent from the cache, the rest computed, and the output equals Hugging Face's."""
    prompt = ("The lighthouse keeper wrote in his log every evening: the weather, the ships that passed, "
              "the birds on the rocks, the colour of the sea, and the names of the visitors who climbed the "
              "stairs to see the lamp. In winter the storms kept everyone away, and he wrote instead about the "
              "sound of the wind, the ice on the windows and the long nights. Years later his grandchildren read it")
    ids = encoder.encode_text(prompt)
    expected = runtime.reference_generate(ids, 10)
    async with grpc.aio.insecure_channel(small_pool_stack["prefill"]) as channel:
        stub = prefill_pb2_grpc.PrefillServiceStub(channel)
        async with GatewayClient(small_pool_stack["gateway"]) as client:
            first = await client.complete(prompt, max_tokens=10, temperature=0, ignore_eos=True)
            before = (await stub.Stats(common_pb2.StatsRequest(), timeout=10)).prefix_hit_tokens_total
            second = await client.complete(prompt, max_tokens=10, temperature=0, ignore_eos=True)
        after = (await stub.Stats(common_pb2.StatsRequest(), timeout=10)).prefix_hit_tokens_total
    assert len(ids) > 64 and after - before == (len(ids) - 1) // 32 * 32
    assert first.token_ids == second.token_ids == expected
