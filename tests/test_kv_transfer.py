"""Bad KV chunks sent straight to a decode worker get a clear status; the worker keeps serving."""

from __future__ import annotations

import asyncio
import itertools
import zlib
from collections.abc import Callable

import grpc
import pytest

from services.client import GatewayClient
from services.common.pb import common_pb2, decode_pb2_grpc, kv_pb2
from services.common.healthcheck import health_status
from services.common.kv_codec import CRC32
from services.common.kv_wire import to_pb
from tests.kv_helpers import Message, admit, read_tokens, real_transfer, replace, send

NUM_TOKENS = 5
_ids = itertools.count()


def corrupt_checksum(m: list[Message]) -> list[Message]:
    chunk = m[3]
    return [*m[:3], replace(chunk, data=bytes([chunk.data[0] ^ 1]) + chunk.data[1:]), *m[4:]]


def wrong_crc32c(m: list[Message]) -> list[Message]:
    chunk = m[2]
    return [*m[:2], replace(chunk, crc32c=chunk.crc32c ^ 1), *m[3:]]


def crc32_in_a_crc32c_transfer(m: list[Message]) -> list[Message]:
    """The data's valid CRC-32 in the field the layout does not name (crc32c left 0)."""
    chunk = m[1]
    return [m[0], replace(chunk, crc32=zlib.crc32(chunk.data), crc32c=0), *m[2:]]


def unknown_checksum_kind(m: list[Message]) -> list[Message]:
    layout = to_pb(m[0])
    layout.layout.checksum = 99
    return [layout, *m[1:]]


def wrong_fingerprint(m: list[Message]) -> list[Message]:
    return [replace(m[0], model_fingerprint="0123456789abcdef"), *m[1:]]


def wrong_chunk_fingerprint(m: list[Message]) -> list[Message]:
    return [*m[:2], replace(m[2], model_fingerprint="0123456789abcdef"), *m[3:]]


def missing_last_chunk(m: list[Message]) -> list[Message]:
    return [*m[:-2], m[-1]]


def missing_middle_chunk(m: list[Message]) -> list[Message]:
    return [*m[:2], *m[3:]]


def out_of_order(m: list[Message]) -> list[Message]:
    return [m[0], m[2], m[1], *m[3:]]


def duplicate(m: list[Message]) -> list[Message]:
    return [*m[:3], m[2], *m[3:]]


def misshaped(m: list[Message]) -> list[Message]:
    chunk = m[1]
    return [m[0], replace(chunk, shape=(*chunk.shape[:-1], chunk.shape[-1] - 1)), *m[2:]]


def wrong_byte_length(m: list[Message]) -> list[Message]:
    chunk = m[1]
    return [m[0], replace(chunk, data=chunk.data[:-4], byte_length=chunk.byte_length - 4), *m[2:]]


def wrong_span(m: list[Message]) -> list[Message]:
    chunk = m[1]
    return [m[0], replace(chunk, span=replace(chunk.span, token_start=chunk.span.token_start + 1)), *m[2:]]


def no_end(m: list[Message]) -> list[Message]:
    return m[:-1]


def chunk_before_layout(m: list[Message]) -> list[Message]:
    return m[1:]


CASES: list[tuple[str, Callable[[list[Message]], list[Message]], grpc.StatusCode, str]] = [
    ("corrupt-checksum", corrupt_checksum, grpc.StatusCode.DATA_LOSS, "CRC-32C"),
    ("wrong-crc32c", wrong_crc32c, grpc.StatusCode.DATA_LOSS, "CRC-32C"),
    ("crc32-in-a-crc32c-transfer", crc32_in_a_crc32c_transfer, grpc.StatusCode.DATA_LOSS, "CRC-32C"),
    ("unknown-checksum-kind", unknown_checksum_kind, grpc.StatusCode.INVALID_ARGUMENT, "checksum"),
    ("wrong-fingerprint", wrong_fingerprint, grpc.StatusCode.FAILED_PRECONDITION, "model"),
    ("wrong-chunk-fingerprint", wrong_chunk_fingerprint, grpc.StatusCode.FAILED_PRECONDITION, "model"),
    ("missing-last-chunk", missing_last_chunk, grpc.StatusCode.DATA_LOSS, "received"),
    ("missing-middle-chunk", missing_middle_chunk, grpc.StatusCode.INVALID_ARGUMENT, "order"),
    ("out-of-order", out_of_order, grpc.StatusCode.INVALID_ARGUMENT, "order"),
    ("duplicate", duplicate, grpc.StatusCode.INVALID_ARGUMENT, "duplicate"),
    ("misshaped", misshaped, grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    ("wrong-byte-length", wrong_byte_length, grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
    ("wrong-span", wrong_span, grpc.StatusCode.INVALID_ARGUMENT, "covers"),
    ("stream-without-end", no_end, grpc.StatusCode.DATA_LOSS, "end"),
    ("chunk-before-layout", chunk_before_layout, grpc.StatusCode.INVALID_ARGUMENT, "layout"),
]


NO_LAYOUT = ("chunk-before-layout", "unknown-checksum-kind")  # refused before the request is known


@pytest.fixture(scope="module")
async def decode(memory_stack) -> tuple[decode_pb2_grpc.DecodeServiceStub, common_pb2.ModelInfo]:
    channel = grpc.aio.insecure_channel(memory_stack["decode"])
    stub = decode_pb2_grpc.DecodeServiceStub(channel)
    yield stub, await stub.GetModelInfo(common_pb2.ModelInfoRequest())
    await channel.close()


async def _assert_idle(stub: decode_pb2_grpc.DecodeServiceStub) -> None:
    stats = await stub.Stats(common_pb2.StatsRequest())
    assert (stats.active_requests, stats.kv_bytes_held) == (0, 0)


@pytest.mark.parametrize(("name", "mutate", "code", "phrase"), CASES, ids=[c[0] for c in CASES])
async def test_bad_transfer_gets_clear_status(decode, name, mutate, code, phrase) -> None:
    stub, model = decode
    request_id = f"bad-{name}-{next(_ids)}"
    generation = await admit(stub, request_id, NUM_TOKENS)
    messages = mutate(real_transfer(model, request_id, NUM_TOKENS, chunk_tokens=2, chunk_layers=12))
    with pytest.raises(grpc.aio.AioRpcError) as sent:
        await send(stub, messages)
    assert sent.value.code() == code
    assert phrase.lower() in sent.value.details().lower()
    if name not in NO_LAYOUT:  # the request never learned of that transfer; cancel it
        with pytest.raises(grpc.aio.AioRpcError) as generated:
            await generation.read()
        assert generated.value.code() == code
    generation.cancel()
    await _assert_idle_soon(stub)


async def _assert_idle_soon(stub: decode_pb2_grpc.DecodeServiceStub) -> None:
    for _ in range(50):  # blocks of a request cancelled mid-step return when that step ends
        stats = await stub.Stats(common_pb2.StatsRequest())
        if (stats.active_requests, stats.kv_bytes_held) == (0, 0):
            break
        await asyncio.sleep(0.1)
    await _assert_idle(stub)


async def test_oversized_chunk_is_refused(decode) -> None:
    stub, model = decode
    request_id = f"oversized-{next(_ids)}"
    generation = await admit(stub, request_id, 100)
    messages = real_transfer(model, request_id, 100, chunk_tokens=100, chunk_layers=model.num_layers)
    assert len(messages[1].data) > 2 * 1024 * 1024  # the decode under test takes at most 2 MB a chunk
    with pytest.raises(grpc.aio.AioRpcError) as sent:
        await send(stub, messages)
    assert sent.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit" in sent.value.details()
    generation.cancel()
    await _assert_idle_soon(stub)


async def test_transfer_for_unknown_request_is_not_found(decode) -> None:
    stub, model = decode
    with pytest.raises(grpc.aio.AioRpcError) as sent:
        await send(stub, real_transfer(model, "nobody-asked", NUM_TOKENS, 2, 12))
    assert sent.value.code() == grpc.StatusCode.NOT_FOUND


async def test_empty_message_is_invalid(decode) -> None:
    stub, _ = decode
    with pytest.raises(grpc.aio.AioRpcError) as sent:
        await send(stub, [kv_pb2.KvTransferMessage()])
    assert sent.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_handcrafted_good_transfer_is_decoded(decode) -> None:
    stub, model = decode
    request_id = f"good-{next(_ids)}"
    generation = await admit(stub, request_id, NUM_TOKENS, max_tokens=3)
    reply = await send(stub, real_transfer(model, request_id, NUM_TOKENS, 2, 12))
    assert reply.chunks_received == 9
    events = []
    while (event := await generation.read()) is not grpc.aio.EOF:
        events.append(event)
    assert [e.token.index for e in events[:-1]] == [0, 1, 2]  # the transfer's first token, then two decoded
    assert events[0].token.token_id == 42
    assert events[-1].finished.completion_tokens == 3
    await _assert_idle_soon(stub)


async def test_sender_without_checksum_kind_is_checked_with_crc32(decode) -> None:
    """A sender that predates KvLayout.checksum (UNSPECIFIED on the wire) sends CRC-32 in `crc32`:
    its good transfer is decoded and a corrupted chunk is DATA_LOSS."""
    stub, model = decode
    for corrupt in (False, True):
        request_id = f"legacy-{next(_ids)}"
        generation = await admit(stub, request_id, NUM_TOKENS, max_tokens=2)
        messages = [to_pb(m) for m in real_transfer(model, request_id, NUM_TOKENS, 2, 12, checksum=CRC32)]
        messages[0].layout.ClearField("checksum")
        assert messages[1].chunk.crc32 != 0 and messages[1].chunk.crc32c == 0
        if corrupt:
            messages[3].chunk.crc32 ^= 1
            with pytest.raises(grpc.aio.AioRpcError) as sent:
                await send(stub, messages)
            assert sent.value.code() == grpc.StatusCode.DATA_LOSS and "CRC-32 " in sent.value.details()
            generation.cancel()
        else:
            assert (await send(stub, messages)).chunks_received == 9
            assert len(await read_tokens(generation)) == 2
    await _assert_idle_soon(stub)


async def test_decode_keeps_serving_after_bad_transfers(memory_stack, decode, runtime, encoder) -> None:
    stub, _ = decode
    request_id = f"after-{next(_ids)}"
    generation = await admit(stub, request_id, NUM_TOKENS)
    with pytest.raises(grpc.aio.AioRpcError):
        await send(stub, corrupt_checksum(real_transfer(decode[1], request_id, NUM_TOKENS, 2, 12)))
    generation.cancel()
    assert health_status(memory_stack["decode"]) == 1  # SERVING
    async with GatewayClient(memory_stack["gateway"]) as client:
        ids = (await client.complete("The capital of France is", max_tokens=8, temperature=0)).token_ids
    assert ids == runtime.reference_generate(encoder.encode_text("The capital of France is"), 8)
