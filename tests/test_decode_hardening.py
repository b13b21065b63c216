"""Regression tests of the decode hardening: each test proves that one defect found in review is
gone (every one of them failed before the fix). Tiny random-weight model, real processes."""

from __future__ import annotations

import asyncio
import itertools
import math
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch

from services.client import GatewayClient, GatewayError
from services.common.client_stream import ServerStatus
from services.common.kv_codec import encode_chunk
from services.common.kv_wire import to_pb
from services.common.pb import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from services.common.runtime import ModelRuntime
from tests.conftest import RunningStack, add_service, start_stack
from tests.kv_helpers import admit, read_tokens, real_transfer, replace, send
from tests.held import decode_stats, wait_decode_idle

_ids = itertools.count()


@pytest.fixture(scope="module")
def blackhole() -> Iterator[str]:
    """A TCP port that accepts connections and never answers: a kvstore that hangs every call."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, blackhole: str) -> Iterator[RunningStack]:
    """Tiny model. `decode` (2 MB chunks) behind `gateway` and `gateway_kvstore`; `decode_small`
    (4 blocks of 16 tokens) behind `gateway_small`; `decode_blackhole` (8 blocks, its kvstore hangs)
    behind `gateway_blackhole`."""
    running = start_stack(tmp_path_factory.mktemp("hardening"), "tiny", extra={"decode": ("--max-chunk-mb", "2")},
                          extra_gateways={"gateway_kvstore": ("--kv-transfer", "kvstore")})
    try:
        small = add_service(running, "decode_small", "decode", "--kv-pool-blocks", "4", "--block-size", "16")
        add_service(running, "gateway_small", "gateway", "--decode-addresses", small)
        hung = add_service(running, "decode_blackhole", "decode", "--kv-pool-blocks", "8", "--block-size", "16",
                           "--kvstore-address", blackhole, "--kvstore-timeout-seconds", "6")
        add_service(running, "gateway_blackhole", "gateway", "--decode-addresses", hung)
        yield running
    finally:
        running.stack.stop()


@dataclass(frozen=True)
class Decode:
    stub: decode_pb2_grpc.DecodeServiceStub
    model: common_pb2.ModelInfo
    address: str


@pytest.fixture(scope="module")
async def decode(stack: RunningStack) -> Decode:
    async with grpc.aio.insecure_channel(stack["decode"]) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        yield Decode(stub, await stub.GetModelInfo(common_pb2.ModelInfoRequest()), stack["decode"])


async def assert_pool_empty(address: str) -> None:
    """Every request gone and every block back (a request cancelled mid-step frees at step end)."""
    stats = await wait_decode_idle(address)
    assert (stats.active_requests, stats.blocks_used) == (0, 0), stats


async def assert_still_serves(stack: RunningStack, gateway: str, tiny: ModelRuntime, encoder) -> None:
    """An ordinary request completes, exactly, well within a deadline (a dead loop would hang it)."""
    prompt = "The capital of France is"
    async with GatewayClient(stack[gateway]) as client:
        result = await client.complete(prompt, max_tokens=8, temperature=0, ignore_eos=True, timeout=60)
    assert result.token_ids == tiny.reference_generate(encoder.encode_text(prompt), 8)


# 1. A non-finite KV budget was accepted, reserved blocks, raised INTERNAL and leaked them.
@pytest.mark.parametrize("budget", [math.inf, math.nan, -1.0])
async def test_non_finite_or_negative_kv_budget_is_refused_and_leaks_no_blocks(stack, budget: float) -> None:
    async with GatewayClient(stack["gateway"]) as client:
        with pytest.raises(GatewayError) as caught:
            await client.complete("Hello", max_tokens=4, temperature=0, max_cache_budget_mb=budget, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_cache_budget_mb" in caught.value.details()
    async with grpc.aio.insecure_channel(stack["decode"]) as channel:  # straight to the decode worker too
        call = decode_pb2_grpc.DecodeServiceStub(channel).Generate(decode_pb2.DecodeRequest(
            request_id=f"budget-{next(_ids)}", prompt_token_ids=[1, 2, 3], max_cache_budget_mb=budget,
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=2),
            kv_source=decode_pb2.KV_SOURCE_DIRECT), timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await assert_pool_empty(stack["decode"])


async def test_huge_finite_kv_budget_is_served(stack, tiny, encoder) -> None:
    async with GatewayClient(stack["gateway"]) as client:
        result = await client.complete("Hello", max_tokens=4, temperature=0, max_cache_budget_mb=1e308, timeout=60)
    assert result.token_ids == tiny.reference_generate(encoder.encode_text("Hello"), 4)
    await assert_pool_empty(stack["decode"])


# 2. An out-of-vocabulary first token killed the decode loop while health said SERVING.
async def test_first_token_outside_the_vocabulary_is_refused_and_the_loop_keeps_serving(
        stack, decode, tiny, encoder) -> None:
    stub, model = decode.stub, decode.model
    request_id = f"vocab-{next(_ids)}"
    generation = await admit(stub, request_id, 5)
    with pytest.raises(grpc.aio.AioRpcError) as sent:
        await send(stub, real_transfer(model, request_id, 5, 2, 4, first_token=2**31))
    assert sent.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "vocab" in sent.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as generated:
        await generation.read()
    assert generated.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await assert_still_serves(stack, "gateway", tiny, encoder)
    await assert_pool_empty(stack["decode"])


@pytest.mark.parametrize("service", ["decode", "prefill"])
async def test_prompt_token_outside_the_vocabulary_is_invalid_argument(stack, service: str) -> None:
    prompt = [1, 2, 10**7]
    async with grpc.aio.insecure_channel(stack[service]) as channel:
        if service == "decode":
            call = decode_pb2_grpc.DecodeServiceStub(channel).Generate(decode_pb2.DecodeRequest(
                request_id=f"vocab-{next(_ids)}", prompt_token_ids=prompt, kv_source=decode_pb2.KV_SOURCE_LOCAL,
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=2)), timeout=30)
        else:
            call = prefill_pb2_grpc.PrefillServiceStub(channel).Prefill(prefill_pb2.PrefillRequest(
                request_id=f"vocab-{next(_ids)}", prompt_token_ids=prompt, decode_address=stack["decode"],
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=2)), timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "vocab" in caught.value.details()
    await assert_pool_empty(stack["decode"])


@pytest.mark.parametrize("temperature", [1e-38, 1e-6, math.inf])
async def test_temperature_that_overflows_the_logits_is_invalid_argument(stack, temperature: float) -> None:
    async with GatewayClient(stack["gateway"]) as client:
        with pytest.raises(GatewayError) as caught:
            await client.complete("Hello", max_tokens=4, temperature=temperature, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in caught.value.details()
    await assert_pool_empty(stack["decode"])


# 3. KV of a cancelled request was still written into its freed blocks, now another request's.
async def test_late_transfer_after_cancel_is_refused_and_cannot_touch_the_next_requests_kv(decode) -> None:
    stub, model = decode.stub, decode.model
    tokens, max_tokens = 40, 6

    async def clean_run(request_id: str) -> list[int]:
        generation = await admit(stub, request_id, tokens, max_tokens=max_tokens, ignore_eos=True)
        await send(stub, real_transfer(model, request_id, tokens, 8, 4, first_token=7, seed=1))
        return await read_tokens(generation)

    expected = await clean_run(f"clean-{next(_ids)}")
    cancelled, victim = f"cancelled-{next(_ids)}", f"victim-{next(_ids)}"
    late = real_transfer(model, cancelled, tokens, 8, 4, seed=2)
    generation = await admit(stub, cancelled, tokens)
    late_call = stub.TransferKv(timeout=30)
    for message in late[:2]:  # layout and the first chunk arrive while the request is alive
        await late_call.write(to_pb(message))
    generation.cancel()
    await assert_pool_empty(decode.address)
    victim_generation = await admit(stub, victim, tokens, max_tokens=max_tokens, ignore_eos=True)
    victim_messages = real_transfer(model, victim, tokens, 8, 4, first_token=7, seed=1)
    victim_call = stub.TransferKv(timeout=30)
    for message in victim_messages[:-1]:
        await victim_call.write(to_pb(message))
    await assert_refused(late_call, late[2:])  # the rest of the late transfer
    await victim_call.write(to_pb(victim_messages[-1]))
    await victim_call.done_writing()
    await victim_call
    assert await read_tokens(victim_generation) == expected
    await assert_pool_empty(decode.address)


async def assert_refused(call: grpc.aio.StreamUnaryCall, rest: list) -> None:
    """The rest of a transfer whose request is gone (or superseded) is refused, never acknowledged."""
    status = ServerStatus(call)  # grpc.aio may report its own INTERNAL instead (client_stream)
    with pytest.raises((grpc.aio.AioRpcError, asyncio.InvalidStateError)):
        for message in rest:
            await call.write(to_pb(message))
        await call.done_writing()
        await call
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        try:
            await call
        except grpc.aio.AioRpcError as error:
            raise status.error(error) from None
    assert refused.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.NOT_FOUND)


# 4. A request that can never fit the pool was admitted, preempted alone, and hung forever.
async def test_request_larger_than_the_pool_is_refused_at_admission(stack) -> None:
    async with GatewayClient(stack["gateway_small"]) as client:
        with pytest.raises(GatewayError) as caught:
            await client.complete("hello " * 40, max_tokens=60, temperature=0, ignore_eos=True, timeout=60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "pool" in caught.value.details()
    await assert_pool_empty(stack["decode_small"])


async def test_lone_request_that_fills_the_pool_completes(stack, tiny, encoder) -> None:
    prompt = "hello " * 9  # 10 tokens + 54 generated: exactly the pool's 64 tokens
    async with GatewayClient(stack["gateway_small"]) as client:
        result = await client.complete(prompt, max_tokens=55, temperature=0, ignore_eos=True, timeout=120)
    assert result.token_ids == tiny.reference_generate(encoder.encode_text(prompt), 55)
    await assert_pool_empty(stack["decode_small"])


# 5. Swap I/O was awaited inside the scheduler: every running sequence stalled while one swapped.
async def test_running_sequences_keep_stepping_while_another_swaps(stack, tiny, encoder) -> None:
    first, second = "One two three four five six", "Seven eight nine ten eleven"
    before = (await decode_stats(stack["decode_blackhole"])).preemptions_total
    arrivals: list[float] = []

    async def long_stream() -> list[int]:
        ids = []
        async for chunk in client.generate(first, max_tokens=110, temperature=0, ignore_eos=True, timeout=120):
            arrivals.extend(time.monotonic() for _ in chunk.token_ids)
            ids += chunk.token_ids
        return ids

    async def joins_later() -> list[int]:
        while not arrivals:  # joins once the long stream is decoding
            await asyncio.sleep(0.005)
        return (await client.complete(second, max_tokens=100, temperature=0, ignore_eos=True, timeout=120)).token_ids

    async with GatewayClient(stack["gateway_blackhole"]) as client:
        long_ids, later_ids = await asyncio.gather(long_stream(), joins_later())
    assert (await decode_stats(stack["decode_blackhole"])).preemptions_total > before  # someone swapped out
    assert long_ids == tiny.reference_generate(encoder.encode_text(first), 110)
    assert later_ids == tiny.reference_generate(encoder.encode_text(second), 100)
    longest_gap = max(b - a for a, b in zip(arrivals, arrivals[1:]))
    assert longest_gap < 3.0, f"a stream stalled {longest_gap:.1f}s while another sequence swapped (store hangs 6s)"
    await assert_pool_empty(stack["decode_blackhole"])


# 6. Client-chosen request ids were used as internal keys: two requests with one id collided.
@pytest.mark.parametrize("gateway", ["gateway", "gateway_kvstore"])
async def test_concurrent_requests_with_the_same_client_id_are_independent(stack, tiny, encoder,
                                                                           gateway: str) -> None:
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    async with GatewayClient(stack[gateway]) as client:
        results = await asyncio.gather(*(client.complete(p, max_tokens=12, temperature=0, ignore_eos=True,
                                                         request_id="same-id", timeout=60) for p in prompts))
    for prompt, result in zip(prompts, results):
        assert result.request_id == "same-id"  # the client's id stays its label
        assert result.token_ids == tiny.reference_generate(encoder.encode_text(prompt), 12), prompt
    await assert_pool_empty(stack["decode"])


# 7. A NaN or infinity inside a CRC-valid chunk was accepted and poisoned the whole batch.
@pytest.mark.parametrize("poison", [math.nan, math.inf])
async def test_kv_chunk_with_non_finite_values_is_data_loss(decode, poison: float) -> None:
    stub, model = decode.stub, decode.model
    request_id = f"poison-{next(_ids)}"
    generation = await admit(stub, request_id, 5)
    messages = real_transfer(model, request_id, 5, 5, model.num_layers)
    layout, chunk = messages[0], messages[1]
    tensor = torch.frombuffer(bytearray(chunk.data), dtype=torch.float32).clone()
    tensor[3] = poison
    size = (model.num_layers, model.num_kv_heads, 5, model.head_dim)
    keys = tensor.view(model.num_layers, 2, model.num_kv_heads, 5, model.head_dim)[:, 0].reshape(size)
    values = tensor.view(model.num_layers, 2, model.num_kv_heads, 5, model.head_dim)[:, 1].reshape(size)
    poisoned = encode_chunk(layout, 0, keys, values)  # a valid CRC over the poisoned bytes
    with pytest.raises(grpc.aio.AioRpcError) as sent:
        await send(stub, [layout, poisoned, messages[2]])
    assert sent.value.code() == grpc.StatusCode.DATA_LOSS
    assert "finite" in sent.value.details()
    generation.cancel()
    await assert_pool_empty(decode.address)


async def test_replaced_chunk_keeps_its_crc_checked(decode) -> None:
    """The poisoning helper above really produces CRC-valid chunks (so the test means something)."""
    stub, model = decode.stub, decode.model
    request_id = f"control-{next(_ids)}"
    generation = await admit(stub, request_id, 5, max_tokens=2)
    messages = real_transfer(model, request_id, 5, 5, model.num_layers)
    layout, chunk = messages[0], messages[1]
    size = (model.num_layers, model.num_kv_heads, 5, model.head_dim)
    tensor = torch.frombuffer(bytearray(chunk.data), dtype=torch.float32).clone().view(
        model.num_layers, 2, model.num_kv_heads, 5, model.head_dim)
    again = encode_chunk(layout, 0, tensor[:, 0].reshape(size), tensor[:, 1].reshape(size))
    assert replace(again, data=chunk.data) == chunk
    await send(stub, [layout, again, messages[2]])
    assert len(await read_tokens(generation)) == 2  # the transfer's first token, then one decoded


# A retried transfer (another prefill worker) for a request whose first sender died or froze.
async def test_sender_that_goes_away_leaves_the_request_waiting_for_a_retry(decode) -> None:
    stub, model = decode.stub, decode.model
    expected_id, retried_id = f"clean-{next(_ids)}", f"retried-{next(_ids)}"
    generation = await admit(stub, expected_id, 12, max_tokens=4, ignore_eos=True)
    await send(stub, real_transfer(model, expected_id, 12, 4, 2, first_token=9, seed=3))
    expected = await read_tokens(generation)
    generation = await admit(stub, retried_id, 12, max_tokens=4, ignore_eos=True)
    dying = stub.TransferKv(timeout=30)
    for message in real_transfer(model, retried_id, 12, 4, 2, first_token=9, seed=4)[:3]:
        await dying.write(to_pb(message))
    dying.cancel()  # the first prefill worker died mid-transfer
    await asyncio.sleep(1.5)
    assert (await decode_stats(decode.address)).awaiting_kv == 1  # still waiting, not failed
    layout, *rest = real_transfer(model, retried_id, 12, 4, 2, first_token=9, seed=3)
    await send(stub, [replace(layout, transfer_attempt=1), *rest])
    assert await read_tokens(generation) == expected
    await assert_pool_empty(decode.address)


async def test_retried_transfer_supersedes_a_frozen_one_whose_late_chunks_are_refused(decode) -> None:
    stub, model = decode.stub, decode.model
    request_id = f"superseded-{next(_ids)}"
    generation = await admit(stub, request_id, 12, max_tokens=4, ignore_eos=True)
    frozen_messages = real_transfer(model, request_id, 12, 4, 2, seed=5)
    frozen = stub.TransferKv(timeout=30)
    for message in frozen_messages[:3]:
        await frozen.write(to_pb(message))
    layout, *rest = real_transfer(model, request_id, 12, 4, 2, first_token=9, seed=3)
    with pytest.raises(grpc.aio.AioRpcError) as again:  # the same attempt twice is a protocol error
        await send(stub, [layout])
    assert again.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "already has" in again.value.details()
    await send(stub, [replace(layout, transfer_attempt=1), *rest])
    await assert_refused(frozen, frozen_messages[3:])  # the frozen sender wakes up
    assert (await read_tokens(generation))[0] == 9  # the superseding transfer's first token, then 3 more
    await assert_pool_empty(decode.address)


# Found by hand against `make up`: bad values in fields of the worker requests.
@pytest.mark.parametrize(("field", "value"), [("position_offset", 2), ("position_offset", 2**32 - 1),
                                              ("kv_source", 7), ("client_request_id", "z" * 10_000),
                                              ("client_request_id", "bad label!")])
async def test_bad_decode_request_field_is_invalid_argument_at_once(stack, field: str, value: object) -> None:
    request = decode_pb2.DecodeRequest(request_id=f"field-{next(_ids)}", prompt_token_ids=[1, 2, 3],
                                       sampling=common_pb2.SamplingParams(temperature=0, max_tokens=2),
                                       kv_source=decode_pb2.KV_SOURCE_LOCAL)
    setattr(request, field, value)
    async with grpc.aio.insecure_channel(stack["decode"]) as channel:
        call = decode_pb2_grpc.DecodeServiceStub(channel).Generate(request, timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert field in caught.value.details()
    await assert_pool_empty(stack["decode"])


async def test_bad_prefill_label_is_invalid_argument(stack) -> None:
    async with grpc.aio.insecure_channel(stack["prefill"]) as channel:
        call = prefill_pb2_grpc.PrefillServiceStub(channel).Prefill(prefill_pb2.PrefillRequest(
            request_id=f"label-{next(_ids)}", prompt_token_ids=[1, 2], decode_address=stack["decode"],
            client_request_id="z" * 10_000, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=2)),
            timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "client_request_id" in caught.value.details()
