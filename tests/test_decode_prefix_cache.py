"""Prefix caching on the decode worker: the full prompt blocks of a sequence whose KV arrived stay
in the pool after it ends, evictable (least recently used first) and counted as free; a later
prompt with the same prefix shares them, Accepted says how many tokens it holds, and the transfer
carries only the rest (KvLayout.token_start). Cached blocks go before any running sequence is
preempted and never count toward the reject threshold; a transfer that claims a start the decode
does not hold, and a bad salt, get clear statuses."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from services.client import GatewayClient
from services.common.errors import CapacityExhausted, KvProtocolError
from services.common.kv_codec import KvEnd, KvLayout, encode_chunk
from services.common.kv_assembly import AssemblyLimits, KvAssembler
from services.common.pb import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from services.common.prefix_keys import block_keys
from services.common.runtime import ModelRuntime
from services.decode.blocks import BlockManager, LeasedWriter
from services.decode.pool import BlockPool, PoolConfig
from services.common.sampling import Sampling
from services.decode.admission import Admission, AdmissionLimits
from services.decode.cached_blocks import CachedBlocks
from services.decode.engine import DecodeEngine
from services.decode.sequence import Sequence
from services.decode.scheduler import Scheduler, SchedulerLimits, StepPlan
from services.gateway.text import PromptEncoder
from tests.conftest import RunningStack
from tests.engine_harness import PROMPT, Harness
from tests.kv_helpers import admit, real_transfer, replace, send
from tests.test_scheduler import GEOMETRY, admitted, step

BLOCK = 16
KEYS = [f"k{i}" for i in range(8)]


def _manager(blocks: int) -> BlockManager:
    return BlockManager(PoolConfig(blocks, BLOCK), CachedBlocks())


def test_a_finished_prompt_stays_cached_evictable_and_counted_as_free() -> None:
    manager = _manager(8)
    manager.allocate("a", 3 * BLOCK + 5)  # 3 full blocks and a partial one
    manager.remember("a", KEYS[:3])
    assert (manager.used, manager.cache.cached, manager.cache.evictable) == (4, 3, 0)  # type: ignore[union-attr]
    manager.free("a")
    assert (manager.used, manager.free_blocks, manager.pressure) == (0, 8, 0.0)
    assert manager.cache.evictable == 3  # type: ignore[union-attr]
    cached = manager.lookup(KEYS[:2])
    assert cached == manager.lookup(KEYS)[:2] and len(manager.lookup(KEYS)) == 3
    manager.allocate("b", 3 * BLOCK, cached=cached)
    assert manager.table("b")[:2] == cached and manager.used == 3
    assert manager.cache.evictable == 1  # type: ignore[union-attr]  # the third stayed behind


def test_running_sequences_with_one_prefix_share_its_blocks() -> None:
    manager = _manager(8)
    manager.allocate("a", 2 * BLOCK + 1)
    manager.remember("a", KEYS[:2])
    manager.allocate("b", 2 * BLOCK + 1, cached=manager.lookup(KEYS[:2]))
    assert manager.table("a")[:2] == manager.table("b")[:2] and manager.used == 4
    manager.free("a")
    assert manager.used == 3 and manager.cache.evictable == 0  # type: ignore[union-attr]  # b still uses them
    manager.free("b")
    assert manager.used == 0 and manager.cache.evictable == 2  # type: ignore[union-attr]


def test_new_work_evicts_the_least_recently_used_cached_blocks_tail_first() -> None:
    manager = _manager(4)
    for name, keys in (("old", KEYS[:2]), ("new", KEYS[2:4])):
        manager.allocate(name, 2 * BLOCK)
        manager.remember(name, keys)
        manager.free(name)
    assert manager.free_blocks == 4 and manager.used == 0  # the pool is all cached blocks
    manager.allocate("c", BLOCK)
    # the older prompt loses its last block first: its first block still starts a usable prefix
    assert manager.cache.evictions_total == 1 and manager.lookup(KEYS[:2]) != []  # type: ignore[union-attr]
    assert len(manager.lookup(KEYS[:2])) == 1 and len(manager.lookup(KEYS[2:4])) == 2
    with pytest.raises(CapacityExhausted):
        manager.allocate("d", 3 * BLOCK + 1)  # 4 blocks: only 3 free or evictable
    manager.allocate("d", 3 * BLOCK)
    assert manager.cache.cached == 0 and manager.used == 4  # type: ignore[union-attr]


def test_a_flush_returns_pool_accounting_to_zero() -> None:
    manager = _manager(8)
    for name, keys in (("done", KEYS[:2]), ("running", KEYS[4:6])):
        manager.allocate(name, 2 * BLOCK + 3)
        manager.remember(name, keys)
    manager.free("done")
    assert manager.flush() == 2 and manager.cache.cached == 0  # type: ignore[union-attr]
    assert manager.lookup(KEYS[4:6]) == []  # no longer offered while still in use
    manager.free("running")
    assert (manager.used, manager.cache.cached, manager.cache.evictable) == (0, 0, 0)  # type: ignore[union-attr]
    assert manager.free_blocks == manager.total


def test_no_running_sequence_is_preempted_while_cached_blocks_can_be_evicted() -> None:
    manager = _manager(6)
    scheduler = Scheduler(manager, SchedulerLimits(8, 0.85, GEOMETRY.kv_bytes_per_token))
    for name, keys in (("x", KEYS[:2]), ("y", KEYS[2:4])):
        manager.allocate(name, 2 * BLOCK)
        manager.remember(name, keys)
        manager.free(name)
    growers = [admitted(manager, name, BLOCK - 1, at=at) for at, name in enumerate(("a", "b"))]
    for grower in growers:  # one block each; the other 4 hold cached blocks
        grower.generated.append(5)
        scheduler.ready(grower)
    for _ in range(BLOCK):  # each grows into a second block: evictions make the room, never a preemption
        plan = scheduler.schedule()
        assert plan.run == growers and plan.swap_out == []
        step(scheduler, plan.run)
    assert manager.cache.evictions_total == 2 and manager.pressure == 4 / 6  # type: ignore[union-attr]


def test_a_write_below_the_floor_leaves_the_shared_blocks_alone() -> None:
    config = PoolConfig(4, BLOCK)
    manager, pool = _manager(4), BlockPool(config, GEOMETRY, torch.device("cpu"))
    owner = manager.allocate("owner", 2 * BLOCK)
    LeasedWriter(pool, manager, owner).write(0, 0, torch.ones(1, 2 * BLOCK, 4), torch.ones(1, 2 * BLOCK, 4))
    manager.remember("owner", KEYS[:1])
    heir = manager.allocate("heir", 2 * BLOCK, cached=manager.lookup(KEYS[:1]))
    LeasedWriter(pool, manager, heir, floor=BLOCK).write(0, 0, torch.zeros(1, 2 * BLOCK, 4),
                                                         torch.zeros(1, 2 * BLOCK, 4))
    keys, _ = pool.read(manager.table("heir"), 0, 2 * BLOCK)
    assert keys[:, :BLOCK].eq(1).all() and keys[:, BLOCK:].eq(0).all()


def test_a_layout_starting_later_cuts_its_chunks_from_there() -> None:
    layout = KvLayout("r", "f", 2, 1, 4, 50, 16, 2, "float32", token_start=20)
    assert layout.token_chunks == 3 and layout.sent_tokens == 30
    assert [(s.token_start, s.token_end) for s in map(layout.span, range(3))] == [(20, 32), (32, 48), (48, 50)]
    assert list(layout.token_range_chunks(0, 32)) == [0] and list(layout.token_range_chunks(32, 50)) == [1, 2]
    with pytest.raises(KvProtocolError, match="token_start"):
        KvLayout("r", "f", 2, 1, 4, 50, 16, 2, "float32", token_start=50)


async def test_a_repeated_local_prompt_computes_only_after_its_cached_blocks_and_answers_the_same(
        harness, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, prompt = harness.engine, PROMPT * 6  # 36 tokens: 2 full blocks may be cached
    computed, forward = [], tiny.prefill_scored

    def counted(token_ids: list[int], *args: object) -> object:
        computed.append(len(token_ids))
        return forward(token_ids, *args)

    monkeypatch.setattr(tiny, "prefill_scored", counted)
    first = harness.admit("first", prompt)
    engine.prefill_locally(first)
    assert first.cached_tokens == 0 and await harness.tokens(first) == tiny.reference_generate(prompt, 6)
    engine.release(first)
    assert engine.blocks.used == 0 and engine.blocks.cache.evictable == 2
    again = harness.admit("again", prompt)
    assert again.cached_tokens == 2 * BLOCK and engine.blocks.cache.evictable == 0
    engine.prefill_locally(again)
    assert await harness.tokens(again) == tiny.reference_generate(prompt, 6)
    assert computed == [36, 36 - 2 * BLOCK]  # the second prefill ran over the last 4 tokens only
    engine.release(again)
    assert engine.blocks.flush() == 2 and engine.blocks.used == 0 and engine.blocks.cache.cached == 0


async def _decode_stats(address: str) -> decode_pb2.DecodeStats:
    """The decode's Stats once it holds no request's blocks (a request it streamed the last token of
    is released a moment later), or after 10 s."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        for _ in range(100):
            stats = await stub.Stats(common_pb2.StatsRequest(), timeout=10)
            if stats.blocks_used == 0:
                break
            await asyncio.sleep(0.1)
    return stats


@pytest.mark.parametrize("gateway", ["gateway", "gateway_kvstore"])
async def test_a_repeated_prompt_moves_no_block_the_decode_holds(memory_stack: RunningStack, runtime: ModelRuntime,
                                                                 encoder: PromptEncoder, gateway: str) -> None:
    prompt = (f"Decode workers keep the blocks of prompts they served ({gateway}): a second identical prompt "
              "moves only its end. ")
    ids = encoder.encode_text(prompt)
    held = (len(ids) - 1) // BLOCK * BLOCK
    per_token = runtime.geometry.kv_bytes_per_token
    async with GatewayClient(memory_stack[gateway]) as client:
        before = await _decode_stats(memory_stack["decode"])
        first = await client.complete(prompt, max_tokens=6, temperature=0, ignore_eos=True)
        middle = await _decode_stats(memory_stack["decode"])
        second = await client.complete(prompt, max_tokens=6, temperature=0, ignore_eos=True)
    after = await _decode_stats(memory_stack["decode"])
    assert held > 0 and first.token_ids == second.token_ids == runtime.reference_generate(ids, 6)
    assert middle.kv_bytes_received_total - before.kv_bytes_received_total == len(ids) * per_token
    assert after.prefix_hit_tokens - middle.prefix_hit_tokens == held
    assert after.kv_bytes_received_total - middle.kv_bytes_received_total == (len(ids) - held) * per_token
    assert after.kv_bytes_saved_total - middle.kv_bytes_saved_total == held * per_token
    assert after.blocks_used == 0 and after.prefix_evictable_blocks >= held // BLOCK


async def test_reset_prefix_cache_returns_the_pool_to_nothing_held(memory_stack: RunningStack) -> None:
    async with GatewayClient(memory_stack["gateway"]) as client:
        await client.complete("A prompt long enough to leave a few full blocks in the decode's prefix cache once it "
                              "has been answered, which the reset then empties.", max_tokens=2, temperature=0)
    assert (await _decode_stats(memory_stack["decode"])).prefix_evictable_blocks > 0
    async with grpc.aio.insecure_channel(memory_stack["decode"]) as channel:
        reply = await decode_pb2_grpc.DecodeServiceStub(channel).ResetPrefixCache(
            decode_pb2.ResetPrefixCacheRequest(), timeout=10)
    stats = await _decode_stats(memory_stack["decode"])
    assert reply.blocks_freed > 0 and (stats.prefix_cached_blocks, stats.blocks_used) == (0, 0)


async def test_a_transfer_starting_past_the_held_prefix_is_refused(memory_stack: RunningStack) -> None:
    async with grpc.aio.insecure_channel(memory_stack["decode"]) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        model = await stub.GetModelInfo(common_pb2.ModelInfoRequest(), timeout=10)
        call = await admit(stub, "claims-held-blocks", 40)  # a prompt no earlier test sent: nothing held
        messages = real_transfer(model, "claims-held-blocks", 40, 16, model.num_layers)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await send(stub, [replace(messages[0], token_start=16), *messages[1:]])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "holds only the first 0 tokens" in caught.value.details()
        call.cancel()


async def test_bad_prefix_fields_on_the_workers_are_invalid_argument(memory_stack: RunningStack) -> None:
    async with grpc.aio.insecure_channel(memory_stack["decode"]) as channel:
        call = decode_pb2_grpc.DecodeServiceStub(channel).Generate(decode_pb2.DecodeRequest(
            request_id="long-salt", prompt_token_ids=[1, 2, 3], cache_salt="x" * 257,
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=2), kv_source=decode_pb2.KV_SOURCE_DIRECT))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in caught.value.details()
    async with grpc.aio.insecure_channel(memory_stack["prefill"]) as channel:
        call = prefill_pb2_grpc.PrefillServiceStub(channel).Prefill(prefill_pb2.PrefillRequest(
            request_id="past-the-end", prompt_token_ids=[1, 2, 3], decode_cached_tokens=3,
            decode_address=memory_stack["decode"], sampling=common_pb2.SamplingParams(temperature=0, max_tokens=2)))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "decode_cached_tokens" in caught.value.details()
    assert (await _decode_stats(memory_stack["decode"])).active_requests == 0


# Defects a review found, one test each --------------------------------------------------------

def test_a_request_fits_with_its_cached_prefix_when_the_whole_prompt_would_not() -> None:
    manager = _manager(8)
    manager.allocate("running", 5 * BLOCK + 1)  # 6 blocks; its 5 full ones cached; 2 blocks free
    manager.remember("running", KEYS[:5])
    again = Sequence("again", [1] * (5 * BLOCK + 1), Sampling(temperature=0, max_tokens=4))
    admission = Admission(GEOMETRY, manager, AdmissionLimits(16, 0.95))
    admission.check_room(again, manager.lookup(KEYS[:5]))  # 1 new block needed, not 6
    with pytest.raises(CapacityExhausted, match="needs 6 blocks, 2 free"):
        admission.check_room(again, [])


def test_a_stored_layout_starting_past_the_held_prefix_is_refused() -> None:
    """The announced layout passed admission; the one read back from the kvstore is checked too."""
    layout = KvLayout("r", GEOMETRY.fingerprint, GEOMETRY.num_layers, GEOMETRY.num_kv_heads, GEOMETRY.head_dim, 40,
                      16, 2, GEOMETRY.dtype, token_start=16)
    assembler = KvAssembler("r", GEOMETRY, 40, AssemblyLimits(2**20), None, held_tokens=0)  # type: ignore[arg-type]
    with pytest.raises(KvProtocolError, match="holds only the first 0 tokens"):
        assembler.accept_layout(layout)
    KvAssembler("r", GEOMETRY, 40, AssemblyLimits(2**20), None, held_tokens=16).accept_layout(layout)  # type: ignore


def test_a_flush_keeps_requests_admitted_before_it_from_naming_their_blocks() -> None:
    manager = _manager(8)
    manager.allocate("first", 2 * BLOCK + 1)
    manager.remember("first", KEYS[:2], manager.cache_generation)
    manager.free("first")
    generation = manager.cache_generation
    manager.allocate("admitted", 2 * BLOCK + 1, cached=manager.lookup(KEYS[:2]))  # its KV still on its way
    manager.flush()
    manager.remember("admitted", KEYS[:2], generation)  # its KV arrives after the flush
    manager.free("admitted")
    assert manager.lookup(KEYS[:2]) == [] and manager.cache.cached == 0 and manager.used == 0  # type: ignore


async def _pushed(engine: DecodeEngine, sequence: Sequence, encoding: str, firsts: tuple[int, ...] = ()) -> None:
    """A transfer of random KV in `encoding` into an admitted sequence, completed (first token 5)."""
    g, tokens = engine._runtime.geometry, len(sequence.prompt_ids)
    layout = KvLayout(sequence.request_id, g.fingerprint, g.num_layers, g.num_kv_heads, g.head_dim, tokens, 64,
                      g.num_layers, g.dtype, encoding)
    target, assembler = engine.begin_transfer(layout)
    lease = target.lease
    assembler.accept_layout(layout)
    keys, values = (torch.randn(g.num_layers, g.num_kv_heads, tokens, g.head_dim) for _ in range(2))
    for index in range(layout.chunk_count):
        assembler.accept_chunk(encode_chunk(layout, index, keys, values))
    engine.complete(target, lease, assembler.finish(KvEnd(sequence.request_id, layout.chunk_count, 5, 0, firsts)))


@pytest.mark.parametrize(("encoding", "cached"), [("raw", 2), ("fp8", 0)])
async def test_lossy_kv_joins_no_cache(harness: Harness, encoding: str, cached: int) -> None:
    """fp8 KV depends on its chunk's scales, so on the rest of the prompt it came with: a later
    prompt sharing only the prefix would get values its own transfer would not have carried."""
    engine = harness.engine
    sequence = harness.admit(encoding, PROMPT * 6, max_tokens=2)
    await _pushed(engine, sequence, encoding)
    await harness.tokens(sequence)
    engine.release(sequence)
    assert engine.blocks.cache.cached == cached


async def test_a_refused_transfer_end_counts_no_bytes(harness: Harness) -> None:
    engine = harness.engine
    sequence = harness.admit("one-choice", PROMPT * 6)
    with pytest.raises(KvProtocolError, match="first tokens for 2 choices"):
        await _pushed(engine, sequence, "raw", firsts=(7,))
    assert engine.accounting.kv_bytes_received == 0
    engine.release(sequence)


def test_a_preempted_sequence_resumes_on_its_cached_prefix() -> None:
    """Resuming takes the prompt's cached blocks again instead of evicting them for a copy."""
    manager = _manager(6)
    scheduler = Scheduler(manager, SchedulerLimits(8, 0.85, GEOMETRY.kv_bytes_per_token))
    sequence = admitted(manager, "s", 2 * BLOCK + 8)
    sequence.block_keys = KEYS[:2]
    manager.remember("s", KEYS[:2])
    prefix = manager.table("s")[:2]
    sequence.generated.append(5)
    scheduler.ready(sequence)
    scheduler.schedule()
    scheduler._preempt(sequence, StepPlan())  # as the scheduler does under pressure
    scheduler.copied_out(sequence)
    scheduler._preempt_done(sequence, swapped=False)
    admitted(manager, "other", 3 * BLOCK)  # one block left free; the prefix's two evictable
    plan = scheduler.schedule()
    assert plan.swap_in == [sequence] and manager.table("s")[:2] == prefix
    assert sequence.cached_tokens == 2 * BLOCK and manager.cache.evictions_total == 0  # type: ignore[union-attr]


async def test_a_refused_admission_counts_no_lookup(harness: Harness) -> None:
    """A request the gateway then tries on another worker must count once, where it is admitted."""
    engine = harness.engine
    harness.admit("hog", PROMPT * 80)  # 30 of the 32 blocks
    with pytest.raises(CapacityExhausted):
        harness.admit("refused", PROMPT * 6)
    assert engine.accounting.prefix_lookup_tokens == (480 - 1) // BLOCK * BLOCK


async def test_a_scored_prompt_prefilled_elsewhere_takes_its_cached_prefix(harness: Harness) -> None:
    """Its scores come from the prefill worker: the decode needs only the KV, cached or sent."""
    engine = harness.engine
    first = harness.admit("first", PROMPT * 6)
    engine.prefill_locally(first)
    await harness.tokens(first)
    engine.release(first)
    scored = Sampling(temperature=0, max_tokens=2, prompt_logprobs=1)
    here = engine.admit(Sequence("here", PROMPT * 6, scored, prefilled_here=True))
    elsewhere = engine.admit(Sequence("elsewhere", PROMPT * 6, scored))
    assert (here.cached_tokens, elsewhere.cached_tokens) == (0, 2 * BLOCK)
    engine.release(here)
    engine.release(elsewhere)


@pytest.mark.parametrize("generated", [1, 5])
async def test_a_recomputed_resume_computes_only_after_its_cached_prefix(
        harness: Harness, tiny: ModelRuntime, monkeypatch: pytest.MonkeyPatch, generated: int) -> None:
    """Its KV after the prefix equals a whole recompute's (to rounding); with one token generated
    and a prompt of whole cached blocks there is nothing to compute."""
    engine, prompt = harness.engine, PROMPT * 8 if generated == 1 else PROMPT * 6  # 48 or 36 tokens
    first = harness.admit("first", prompt)
    engine.prefill_locally(first)
    await harness.tokens(first)
    engine.release(first)
    resumed = Sequence("resumed", prompt, Sampling(temperature=0, max_tokens=8), generated=[7] * generated,
                       block_keys=block_keys(prompt, BLOCK, tiny.geometry.fingerprint))
    cached = engine.blocks.lookup(resumed.block_keys[: len(prompt) // BLOCK])
    lease = engine.blocks.allocate("resumed", resumed.kv_tokens + 1, cached=cached)
    resumed.cached_tokens = len(cached) * BLOCK
    computed, forward = [], tiny.prefill
    monkeypatch.setattr(tiny, "prefill", lambda ids, *rest: computed.append(len(ids)) or forward(ids, *rest))
    table = engine.blocks.table("resumed")
    await engine.swapper.swap_in(resumed, LeasedWriter(engine._pool, engine.blocks, lease, resumed.cached_tokens),
                                 table)
    assert computed == ([] if generated == 1 else [resumed.kv_tokens - 2 * BLOCK])
    whole: dict[int, torch.Tensor] = {}
    forward(prompt + [7] * (generated - 1), lambda layer, k, v: whole.__setitem__(layer, k.clone()))
    for layer, keys in whole.items():
        assert torch.allclose(engine._pool.read(table, layer, resumed.kv_tokens)[0], keys, atol=1e-5)
    engine.blocks.free("resumed")
