"""Several choices from one prompt (OpenAI's n and best_of): the prompt is prefilled once, its full
KV blocks are shared by the choices on the decode worker and each choice has its own copy of the
partial last block; choice c samples exactly like a one-choice request with seed + c. Bad values get
400 / INVALID_ARGUMENT naming the field; nothing stays in the pool afterwards."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import httpx
import pytest
import torch

from services.client import GatewayClient, GatewayError
from services.common.errors import InvalidRequest
from services.common.pb import common_pb2, decode_pb2, decode_pb2_grpc
from services.common.runtime import ModelGeometry, ModelRuntime
from services.common.sampling import Sampling
from services.common.kv_wire import request_prefix, swap_prefix
from services.decode.admission import Admission, AdmissionLimits
from services.decode.blocks import BlockManager
from services.decode.pool import BlockPool, PoolConfig
from services.decode.scheduler import Scheduler, SchedulerLimits
from services.decode.sequence import Sequence, State, Token
from services.gateway.text import PromptEncoder
from tests.conftest import RunningStack
from tests.engine_harness import PROMPT, started

MODEL = "SmolLM2-135M-Instruct"
BLOCK = 16
GEOMETRY = ModelGeometry("test", "f" * 16, "float32", num_layers=2, num_kv_heads=1, head_dim=4, max_model_len=4096,
                         eos_token_ids=frozenset({0}), vocab_size=100)


# the block manager ------------------------------------------------------------------------
def test_choices_share_full_blocks_and_copy_the_partial_one_and_all_come_back() -> None:
    blocks = BlockManager(PoolConfig(16, BLOCK))
    blocks.allocate("r", 40, spare=2)  # 3 blocks (the last one partial) + a spare per extra choice
    assert blocks.used == 5
    parent = list(blocks.table("r")[:3])
    _, copy_1 = blocks.fork("r", "r-c1", 40)
    _, copy_2 = blocks.fork("r", "r-c2", 40)
    assert blocks.table("r") == parent and blocks.used == 5  # the spares became the copies
    for child, copy in (("r-c1", copy_1), ("r-c2", copy_2)):
        assert copy is not None and copy[0] == parent[2] and copy[1] not in parent
        assert blocks.table(child) == [*parent[:2], copy[1]]
    assert blocks.freeable(["r"]) == 1 and blocks.freeable(["r-c1"]) == 1  # the full blocks are shared
    assert blocks.free("r") == 1 and blocks.used == 4  # shared blocks stay while a choice holds them
    assert blocks.free("r-c1") == 1 and blocks.free("r-c2") == 3 and blocks.used == 0


def test_shared_blocks_count_as_freed_only_when_every_holder_leaves() -> None:
    """Preempting every choice of a request frees the prompt's shared blocks too: the scheduler
    must count them, or it preempts more than it needs to."""
    blocks = BlockManager(PoolConfig(16, BLOCK))
    blocks.allocate("r", 40, spare=1)
    blocks.fork("r", "r-c1", 40)
    assert blocks.freeable(["r"]) == 1 and blocks.freeable(["r", "r-c1"]) == 4


def test_over_budget_choices_do_not_yield_to_their_own_siblings() -> None:
    blocks = BlockManager(PoolConfig(64, BLOCK))
    scheduler = Scheduler(blocks, SchedulerLimits(8, 0.95, GEOMETRY.kv_bytes_per_token))
    first = Sequence("b", [1] * 40, Sampling(temperature=0, max_tokens=50, n=2), budget_bytes=1)
    first.siblings = [first.sibling(1)]
    first.lease = blocks.allocate("b", 40, spare=1)
    blocks.fork("b", "b-c1", 40)
    for choice in first.choices:
        choice.generated.append(5)
        scheduler.ready(choice)
    plan = scheduler.schedule()
    assert plan.swap_out == [] and plan.run == first.choices  # alone on the worker, neither yields
    other = Sequence("o", [1] * 4, Sampling(temperature=0, max_tokens=5))
    other.lease = blocks.allocate("o", 4)
    other.generated.append(5)
    scheduler.step_ended()
    scheduler.ready(other)
    assert set(scheduler.schedule().swap_out) == set(first.choices)  # another request waits: they yield


def test_a_choice_keeps_its_stored_kv_under_the_request() -> None:
    """One delete of the request's prefix clears every choice's swapped KV, whoever ends it."""
    request = Sequence("req", [1, 2, 3], Sampling(n=3))
    sibling = request.sibling(2)
    assert sibling.request_id == "req-c2" and sibling.request == "req" and sibling.sampling.seed == 2
    assert swap_prefix(sibling.store_id, 1).startswith(request_prefix("req"))
    assert swap_prefix(request.store_id, 1).startswith(request_prefix("req"))


def test_finished_choices_do_not_hold_admission_slots_and_too_many_choices_are_refused() -> None:
    blocks = BlockManager(PoolConfig(64, BLOCK))
    admission = Admission(GEOMETRY, blocks, AdmissionLimits(max_active_requests=3, reject_threshold=0.95))
    live = {name: Sequence(name, [1], Sampling(max_tokens=4), state=State.FINISHED) for name in ("x", "y")}
    admission.check(Sequence("new", [1, 2], Sampling(max_tokens=4, n=3)), live)  # ended choices linger, uncounted
    with pytest.raises(InvalidRequest, match="more than this worker's --max-active-requests"):
        admission.check(Sequence("many", [1, 2], Sampling(max_tokens=4, n=4)), {})


def test_a_prompt_of_whole_blocks_is_shared_entirely() -> None:
    blocks = BlockManager(PoolConfig(8, BLOCK))
    blocks.allocate("r", 32)
    _, copy = blocks.fork("r", "r-c1", 32)
    assert copy is None and blocks.table("r-c1") == blocks.table("r") and blocks.used == 2
    assert blocks.ensure("r-c1", 33) and blocks.used == 3  # its next token gets a block of its own


def test_a_fork_without_a_spare_block_is_refused() -> None:
    blocks = BlockManager(PoolConfig(8, BLOCK))
    blocks.allocate("r", 20)
    with pytest.raises(Exception, match="no spare block"):
        blocks.fork("r", "r-c1", 20)
    assert not blocks.holds_blocks("r-c1") and blocks.used == 2


def test_copy_block_copies_every_layer_bit_for_bit() -> None:
    pool = BlockPool(PoolConfig(4, BLOCK), GEOMETRY, torch.device("cpu"))
    for tensors in (pool.keys, pool.values):
        for layer in tensors:
            layer[1].normal_()
    pool.copy_block(1, 3)
    for tensors in (pool.keys, pool.values):
        assert all(torch.equal(layer[3], layer[1]) for layer in tensors)


def test_n_out_of_range_is_refused_naming_it() -> None:
    for n in (0, 17):
        with pytest.raises(InvalidRequest, match="^n must be in"):
            Sampling(n=n)
    assert Sampling(seed=5, n=3).for_choice(2) == Sampling(seed=7)
    assert Sampling(seed=2**64 - 1, n=2).for_choice(1).seed == 0


# the decode engine, in-process -------------------------------------------------------------
async def _choice_tokens(engine: Any, sequence: Sequence) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    async for event in engine.events(sequence):
        if isinstance(event, Token):
            tokens.setdefault(event.choice, []).append(event.token_id)
    return tokens


async def test_sampled_choices_equal_one_choice_requests_with_their_seeds(tiny: ModelRuntime) -> None:
    async with started(tiny) as harness:
        engine = harness.engine
        sampling = Sampling(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
        together = engine.admit(Sequence("together", list(PROMPT), Sampling(**{**_fields(sampling), "n": 3})))
        engine.prefill_locally(together)
        by_choice = await _choice_tokens(engine, together)
        engine.release(together)
        for choice in range(3):
            alone = engine.admit(Sequence(f"alone-{choice}", list(PROMPT), sampling.for_choice(choice)))
            engine.prefill_locally(alone)
            assert (await _choice_tokens(engine, alone))[0] == by_choice[choice]
            engine.release(alone)
        assert len({tuple(tokens) for tokens in by_choice.values()}) > 1  # they do differ
        assert engine.blocks.used == 0 and not engine.sequences


async def test_preempted_choices_resume_and_finish_like_the_others(tiny: ModelRuntime) -> None:
    """A pool too small for every choice at once: choices are preempted and recomputed (their
    shared blocks are not freed under the others), and every greedy choice equals HF generate."""
    async with started(tiny, blocks=6, batch=4) as harness:
        engine = harness.engine
        prompt = [1, *range(300, 317)]  # 18 tokens: one full shared block and a partial one
        request = engine.admit(Sequence("small-pool", prompt, Sampling(temperature=0, max_tokens=30, ignore_eos=True,
                                                                         n=3)))
        engine.prefill_locally(request)
        by_choice = await _choice_tokens(engine, request)
        engine.release(request)
        expected = tiny.reference_generate(prompt, 30)
        assert by_choice == {0: expected, 1: expected, 2: expected}
        assert engine.preemptions_total > 0
        assert engine.blocks.used == 0 and not engine.sequences


async def test_the_request_ends_once_stop_strings_ended_every_choice(memory_stack: RunningStack) -> None:
    """The decode does not see stop strings: when they have ended every choice at the gateway, the
    gateway ends the stream (and so the request on the worker) instead of waiting for the worker to
    decode max_tokens (1,000 steps, half a minute here) that nobody will see."""
    async with GatewayClient(memory_stack["gateway"]) as client:
        stream = client.generate("One two three four", max_tokens=1000, temperature=0, ignore_eos=True, stop=[" "],
                                 n=2)
        finished = 0
        while finished < 2:
            finished += (await anext(stream)).finish_reason == "stop"
        assert await asyncio.wait_for(anext(stream, None), 10) is None
    assert (await _stats(memory_stack["decode"])).active_requests == 0


def _fields(sampling: Sampling) -> dict[str, Any]:
    return {name: getattr(sampling, name) for name in Sampling.__slots__}


# through the services ------------------------------------------------------------------------
@pytest.mark.parametrize("gateway", ["gateway", "gateway_kvstore", "gateway_unified"])
async def test_greedy_choices_each_equal_hugging_face(memory_stack: RunningStack, runtime: ModelRuntime,
                                                    encoder: PromptEncoder, gateway: str) -> None:
    prompt = "The three primary colors are"
    expected = runtime.reference_generate(encoder.encode_text(prompt), 6)
    async with GatewayClient(memory_stack[gateway]) as client:
        choices = await client.choices(prompt, max_tokens=6, temperature=0, ignore_eos=True, n=3)
    assert [choice.token_ids for choice in choices] == [expected] * 3


async def test_sampled_choices_through_the_services_equal_their_seeds_alone(memory_stack: RunningStack) -> None:
    prompt = "Once upon a time"
    async with GatewayClient(memory_stack["gateway"]) as client:
        together = await client.choices(prompt, max_tokens=8, temperature=1.0, seed=21, ignore_eos=True, n=3,
                                        logprobs=0)
        for index, choice in enumerate(together):
            alone = await client.complete(prompt, max_tokens=8, temperature=1.0, seed=21 + index, ignore_eos=True,
                                          logprobs=0)
            assert choice.token_ids == alone.token_ids and len(choice.logprobs) == 8
            assert [e.logprob for e in choice.logprobs] == pytest.approx([e.logprob for e in alone.logprobs],
                                                                          abs=1e-4)


async def _stats(address: str) -> decode_pb2.DecodeStats:
    async with grpc.aio.insecure_channel(address) as channel:
        return await decode_pb2_grpc.DecodeServiceStub(channel).Stats(common_pb2.StatsRequest(), timeout=10)


async def test_the_decode_holds_the_prompt_once_for_every_choice(memory_stack: RunningStack,
                                                                 encoder: PromptEncoder) -> None:
    """33 prompt tokens: two full blocks shared, the third copied per choice; 11 more tokens never
    need a fourth. Four choices hold 2 + 4 blocks, not 4 x 3, and the pool empties afterwards."""
    prompt = (encoder.encode_text("word " * 40))[:33]
    seen: list[int] = []
    async with GatewayClient(memory_stack["gateway"]) as client:
        stream = client.generate(prompt, max_tokens=12, temperature=0.8, seed=3, ignore_eos=True, n=4)
        async for chunk in stream:
            if chunk.token_ids:
                seen.append((await _stats(memory_stack["decode"])).blocks_used)
    assert max(seen) == 2 + 4
    for _ in range(50):  # the worker frees the blocks as the stream closes
        if (await _stats(memory_stack["decode"])).blocks_used == 0:
            break
        await asyncio.sleep(0.1)
    assert (await _stats(memory_stack["decode"])).blocks_used == 0


async def test_best_of_returns_the_choice_with_the_best_mean_logprob(memory_stack: RunningStack) -> None:
    options = dict(max_tokens=6, temperature=1.2, seed=9, ignore_eos=True)
    async with GatewayClient(memory_stack["gateway"]) as client:
        every = await client.choices("My favourite food is", n=4, logprobs=0, **options)
        best = await client.choices("My favourite food is", n=1, best_of=4, **options)
    means = [sum(e.logprob for e in choice.logprobs) / len(choice.logprobs) for choice in every]
    assert len(best) == 1 and best[0].token_ids == every[means.index(max(means))].token_ids
    assert best[0].logprobs == []  # not asked for: used for ranking only


def _post(stack: RunningStack, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(stack["http"] + path, json={"model": MODEL, "max_tokens": 4, "temperature": 0.7, "seed": 1,
                                                  **body}, timeout=180)


def test_http_completions_with_prompt_lists_index_choices_per_prompt(memory_stack: RunningStack) -> None:
    body = _post(memory_stack, "/v1/completions", {"prompt": ["Hello", "The sky is"], "n": 2}).json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2, 3]
    alone = _post(memory_stack, "/v1/completions", {"prompt": "The sky is", "n": 2}).json()
    assert [c["text"] for c in body["choices"][2:]] == [c["text"] for c in alone["choices"]]
    assert body["usage"]["prompt_tokens"] == 1 + 3  # each prompt counted once, not once per choice
    assert body["usage"]["completion_tokens"] == 4 * 4


def _events(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_http_chat_and_streamed_choices(memory_stack: RunningStack) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    chat = _post(memory_stack, "/v1/chat/completions", {"messages": messages, "n": 2})
    assert [choice["index"] for choice in chat.json()["choices"]] == [0, 1]
    chunks = _events(_post(memory_stack, "/v1/chat/completions", {"messages": messages, "n": 3, "stream": True}))
    for index in range(3):  # each choice's first delta names the role, as OpenAI streams it
        first = next(c for chunk in chunks for c in chunk["choices"] if c["index"] == index)
        assert first["delta"]["role"] == "assistant"
    streamed = _post(memory_stack, "/v1/completions", {"prompt": "Hello", "n": 3, "stream": True,
                                                       "stream_options": {"include_usage": True}})
    events = _events(streamed)
    finishes = [c["index"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert sorted(finishes) == [0, 1, 2]
    whole = _post(memory_stack, "/v1/completions", {"prompt": "Hello", "n": 3}).json()
    for index in range(3):
        text = "".join(c["text"] for e in events for c in e["choices"] if c["index"] == index)
        assert text == whole["choices"][index]["text"]
    assert events[-1]["usage"] == whole["usage"]


@pytest.mark.parametrize(("body", "param"), [({"n": 0}, "n"), ({"n": 17}, "n"), ({"n": 2, "best_of": 1}, "best_of"),
                                             ({"best_of": 3, "stream": True}, "best_of"), ({"best_of": 17}, "best_of")])
def test_http_bad_choice_counts_get_400_naming_the_field(memory_stack: RunningStack, body: dict[str, Any],
                                                         param: str) -> None:
    response = _post(memory_stack, "/v1/completions", {"prompt": "Hello", **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == param


@pytest.mark.parametrize(("options", "field"), [({"n": 17}, "n"), ({"n": 2, "best_of": 1}, "best_of")])
async def test_grpc_bad_choice_counts_get_invalid_argument(memory_stack: RunningStack, options: dict[str, int],
                                                           field: str) -> None:
    async with GatewayClient(memory_stack["gateway"]) as client:
        with pytest.raises(GatewayError) as caught:
            await client.choices("Hello", max_tokens=2, **options)  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in caught.value.details()


async def test_decode_refuses_a_resumed_request_with_several_choices(memory_stack: RunningStack) -> None:
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=8, n=2)
    async with grpc.aio.insecure_channel(memory_stack["decode"]) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        call = stub.Generate(decode_pb2.DecodeRequest(request_id="resumed-n2", prompt_token_ids=[1, 2, 3],
                                                      sampling=sampling, position_offset=1,
                                                      kv_source=decode_pb2.KV_SOURCE_DIRECT), timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "position_offset" in caught.value.details()
