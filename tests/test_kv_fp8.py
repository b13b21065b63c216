"""fp8 on the wire (`--kv-wire-encoding fp8`): the quantization's error bound, greedy agreement with
the raw path through real services, bad fp8 chunks refused like bad raw ones, and non-finite KV
refused at the prefill."""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import AsyncIterator, Callable

import google_crc32c
import grpc
import pytest
import torch

from services.common import kv_fp8
from services.common.errors import KvCorrupted
from services.common.kv_codec import KvChunk
from services.common.pb import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from tests.conftest import RunningStack
from tests.kv_helpers import Message, admit, read_tokens, real_transfer, replace, send

NUM_TOKENS = 5
_ids = itertools.count()


# --- the quantization itself ---------------------------------------------------------------------

def _round_trip(kv: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    data, scales = kv_fp8.quantize(kv, "test chunk")
    assert len(data) == kv.numel() and len(scales) == 4 * kv_fp8.scale_count(tuple(kv.shape))
    decoded = kv_fp8.dequantize(data, scales, tuple(kv.shape), dtype, "test chunk")
    factors = torch.tensor(struct.unpack(f"<{len(scales) // 4}f", scales)).view(*kv.shape[:3], 1, 1)
    return decoded, factors


def test_round_trip_error_is_within_fp8_rounding() -> None:
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.tensor([1e-6, 1e-2, 1.0, 3e2, 4e4]).view(1, 1, 5, 1, 1)  # one per kv head
    kv = torch.randn((3, 2, 5, 9, 16), generator=generator) * magnitudes
    kv[1, 0, 2] = 0.0  # an all-zero slice
    decoded, factors = _round_trip(kv)
    # e4m3: 3 mantissa bits (relative rounding <= 2^-4); below 2^-6 x scale, subnormal steps of 2^-9 x scale
    bound = kv.abs() * 2**-4 + factors * 2**-10
    assert bool(((decoded - kv).abs() <= bound).all())
    assert torch.equal(decoded[1, 0, 2], torch.zeros_like(decoded[1, 0, 2]))
    assert bool((factors > 0).all())
    amax = kv.abs().amax(dim=(3, 4), keepdim=True)
    assert torch.allclose(decoded.abs().amax(dim=(3, 4), keepdim=True), amax, rtol=1e-6)  # the max is exact


def test_dequantizes_into_the_pool_dtype() -> None:
    kv = torch.randn((2, 2, 3, 4, 8), generator=torch.Generator().manual_seed(1))
    for dtype in (torch.bfloat16, torch.float16):
        decoded, factors = _round_trip(kv, dtype)
        assert decoded.dtype == dtype
        assert bool(((decoded.float() - kv).abs() <= kv.abs() * (2**-4 + 2**-7) + factors * 2**-10).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_cannot_be_encoded(bad: float) -> None:
    kv = torch.ones((1, 2, 2, 3, 4))
    kv[0, 1, 1, 2, 3] = bad
    with pytest.raises(KvCorrupted, match="not finite"):
        kv_fp8.quantize(kv, "KV chunk 7")


# --- bad fp8 chunks sent straight to a real decode worker ----------------------------------------

def _checksum(data: bytes | memoryview, scales: bytes) -> int:
    """The CRC-32C of data followed by scales (the prefill's default checksum)."""
    return google_crc32c.extend(google_crc32c.value(bytes(data)), scales)


def _rescaled(chunk: KvChunk, scales: bytes) -> KvChunk:
    """The chunk with other scales and a checksum that matches them (as a buggy sender makes it)."""
    return replace(chunk, scales=scales, crc32c=_checksum(chunk.data, scales))


def _first_scale(value: float) -> Callable[[list[Message]], list[Message]]:
    def mutate(m: list[Message]) -> list[Message]:
        return [m[0], _rescaled(m[1], struct.pack("<f", value) + m[1].scales[4:]), *m[2:]]
    return mutate


def _short_scales(m: list[Message]) -> list[Message]:
    return [m[0], _rescaled(m[1], m[1].scales[:-4]), *m[2:]]


def _short_data(m: list[Message]) -> list[Message]:
    chunk = m[1]
    data = chunk.data[:-1]
    return [m[0], replace(chunk, data=data, byte_length=len(data), crc32c=_checksum(data, chunk.scales)), *m[2:]]


def _raw_sized_data(m: list[Message]) -> list[Message]:
    chunk = m[1]
    data = chunk.data * 4  # float32's size: a sender that forgot to encode
    return [m[0], replace(chunk, data=data, byte_length=len(data), crc32c=_checksum(data, chunk.scales)), *m[2:]]


def _flipped_data(m: list[Message]) -> list[Message]:
    chunk = m[3]
    return [*m[:3], replace(chunk, data=bytes([chunk.data[0] ^ 1]) + chunk.data[1:]), *m[4:]]


def _flipped_scale(m: list[Message]) -> list[Message]:
    chunk = m[3]
    return [*m[:3], replace(chunk, scales=chunk.scales[:-1] + bytes([chunk.scales[-1] ^ 1])), *m[4:]]


def _nan_byte(m: list[Message]) -> list[Message]:
    chunk = m[2]
    data = b"\x7f" + chunk.data[1:]  # e4m3fn's NaN
    return [*m[:2], replace(chunk, data=data, crc32c=_checksum(data, chunk.scales)), *m[3:]]


def _scales_on_raw(m: list[Message]) -> list[Message]:
    return [m[0], _rescaled(m[1], b"\x00\x00\x80\x3f"), *m[2:]]


CASES = [
    ("short-scales", _short_scales, "fp8", grpc.StatusCode.INVALID_ARGUMENT, "scales"),
    ("nan-scale", _first_scale(float("nan")), "fp8", grpc.StatusCode.DATA_LOSS, "scale"),
    ("infinite-scale", _first_scale(float("inf")), "fp8", grpc.StatusCode.DATA_LOSS, "scale"),
    ("zero-scale", _first_scale(0.0), "fp8", grpc.StatusCode.DATA_LOSS, "scale"),
    ("negative-scale", _first_scale(-1.0), "fp8", grpc.StatusCode.DATA_LOSS, "scale"),
    ("short-data", _short_data, "fp8", grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
    ("raw-sized-data", _raw_sized_data, "fp8", grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
    ("data-checksum", _flipped_data, "fp8", grpc.StatusCode.DATA_LOSS, "CRC"),
    ("scales-checksum", _flipped_scale, "fp8", grpc.StatusCode.DATA_LOSS, "CRC"),
    ("nan-code", _nan_byte, "fp8", grpc.StatusCode.DATA_LOSS, "not finite"),
    ("scales-on-raw", _scales_on_raw, "raw", grpc.StatusCode.INVALID_ARGUMENT, "scales"),
]


@pytest.fixture(scope="module")
async def decode(memory_stack: RunningStack) -> AsyncIterator[tuple[decode_pb2_grpc.DecodeServiceStub,
                                                                   common_pb2.ModelInfo]]:
    channel = grpc.aio.insecure_channel(memory_stack["decode"])
    stub = decode_pb2_grpc.DecodeServiceStub(channel)
    yield stub, await stub.GetModelInfo(common_pb2.ModelInfoRequest())
    await channel.close()


async def assert_idle_soon(stub: decode_pb2_grpc.DecodeServiceStub | prefill_pb2_grpc.PrefillServiceStub) -> None:
    for _ in range(50):  # blocks of a request cancelled mid-step return when that step ends
        stats = await stub.Stats(common_pb2.StatsRequest())
        if (stats.active_requests, stats.kv_bytes_held) == (0, 0):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"still holding work: {stats}")


@pytest.mark.parametrize(("name", "mutate", "encoding", "code", "phrase"), CASES, ids=[c[0] for c in CASES])
async def test_bad_fp8_chunk_gets_clear_status(decode, name, mutate, encoding, code, phrase) -> None:
    stub, model = decode
    request_id = f"bad-fp8-{name}-{next(_ids)}"
    generation = await admit(stub, request_id, NUM_TOKENS)
    messages = mutate(real_transfer(model, request_id, NUM_TOKENS, chunk_tokens=2, chunk_layers=12,
                                    encoding=encoding))
    with pytest.raises(grpc.aio.AioRpcError) as sent:
        await send(stub, messages)
    assert sent.value.code() == code
    assert phrase.lower() in sent.value.details().lower()
    with pytest.raises(grpc.aio.AioRpcError) as generated:
        await generation.read()
    assert generated.value.code() == code
    generation.cancel()
    await assert_idle_soon(stub)


async def test_handcrafted_fp8_transfer_is_decoded(decode) -> None:
    stub, model = decode
    request_id = f"good-fp8-{next(_ids)}"
    generation = await admit(stub, request_id, NUM_TOKENS, max_tokens=3)
    messages = real_transfer(model, request_id, NUM_TOKENS, 2, 12, encoding="fp8")
    reply = await send(stub, messages)
    assert reply.chunks_received == 9
    assert len(await read_tokens(generation)) == 3
    await assert_idle_soon(stub)
