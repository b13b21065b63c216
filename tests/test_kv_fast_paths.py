"""The KV data plane's fast paths give what the plain ones give: a chunk's hand-framed wire bytes
parse as protobuf's own message, a received chunk parsed without copying its data equals protobuf's
parse (and anything unusual is left to protobuf), the one-pass finite check finds every NaN and
infinity, and whole-block pool writes land exactly where token-by-token writes would."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import pytest
import torch

from services.common.errors import KvProtocolError
from services.common.kv_codec import (
    CHECKSUMS,
    CRC32,
    CRC32C,
    FP8_ENCODING,
    RAW_ENCODING,
    ChunkSource,
    KvEnd,
    KvLayout,
    all_finite,
    checksum_matches,
    encode_chunk,
)
from services.common.kv_wire import _parse, from_pb, parse_wire, to_pb, wire_bytes
from services.common.pb import kv_pb2
from services.common.runtime import DTYPES, ModelGeometry
from services.decode.pool import BlockPool, PoolConfig


@pytest.mark.parametrize("checksum", [CRC32, CRC32C])
@pytest.mark.parametrize("num_tokens", [1, 7, 200])  # data lengths with 1-, 2- and 3-byte varints
def test_chunk_wire_bytes_parse_as_the_protobuf_message(checksum: str, num_tokens: int) -> None:
    layout = KvLayout("r-1", "fp", 3, 2, 8, num_tokens, 64, 2, "float32", checksum=checksum)
    keys, values = torch.randn(2, 2, num_tokens, 8), torch.randn(2, 2, num_tokens, 8)
    for message in (layout, encode_chunk(layout, 0, keys, values), KvEnd("r-1", layout.chunk_count, 5)):
        parsed = kv_pb2.KvTransferMessage.FromString(wire_bytes(message))
        assert parsed == to_pb(message) and from_pb(parsed) == message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_finite_check_finds_every_non_finite_value(dtype: torch.dtype, poison: float) -> None:
    tensor = torch.randn(2, 2, 3, 33, 8).to(dtype)
    assert all_finite(tensor)
    for position in (0, 777, tensor.numel() - 1):
        poisoned = tensor.clone()
        poisoned.view(-1)[position] = poison
        assert not all_finite(poisoned)


def _token_by_token(pool: BlockPool, blocks: list[int], layer: int, start: int, keys: torch.Tensor,
                    values: torch.Tensor) -> None:
    for row in range(keys.shape[1]):
        block, offset = divmod(start + row, pool.block_size)
        pool.keys[layer][blocks[block], offset] = keys[:, row]
        pool.values[layer][blocks[block], offset] = values[:, row]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])  # numpy copies bf16 as 16-bit integers
def test_block_writes_match_token_by_token_writes(dtype: str) -> None:
    geometry = ModelGeometry(name="m", fingerprint="fp", dtype=dtype, num_layers=2, num_kv_heads=2, head_dim=4,
                             max_model_len=4096, eos_token_ids=frozenset(), vocab_size=10)
    fast, slow = (BlockPool(PoolConfig(64, 4), geometry, torch.device("cpu")) for _ in range(2))
    rng = random.Random(0)
    for trial in range(100):  # runs of blocks (one copy) and scattered blocks (a copy per run)
        first = rng.randrange(0, 32)
        blocks = list(range(first, first + 32)) if trial % 2 else rng.sample(range(64), 32)
        start, length = rng.randrange(0, 60), rng.randrange(1, 60)
        keys, values = (torch.randn(2, length, 4).to(fast.keys[0].dtype) for _ in range(2))
        fast.write(blocks, 1, start, keys, values)
        _token_by_token(slow, blocks, 1, start, keys, values)
    assert all(torch.equal(a, b) for a, b in zip(fast.keys + fast.values, slow.keys + slow.values, strict=True))


@pytest.mark.parametrize("checksum", [CRC32, CRC32C])
def test_received_chunk_is_parsed_without_copying_its_data(checksum: str) -> None:
    layout = KvLayout("r-1", "fp", 3, 2, 8, 9, 4, 2, "float32", checksum=checksum)
    chunk = encode_chunk(layout, 1, torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8))
    for raw in (wire_bytes(chunk), to_pb(chunk).SerializeToString()):  # data last, or in field order
        parsed = parse_wire(raw)
        assert isinstance(parsed.data, memoryview) and parsed == chunk and checksum_matches(checksum, parsed)


def _outcome(parse: Callable[[], object]) -> object:
    try:
        return parse()
    except KvProtocolError:
        return "refused"


def test_anything_but_one_plain_chunk_is_parsed_by_protobuf() -> None:
    layout = KvLayout("r-1", "fp", 3, 2, 8, 9, 4, 2, "float32")
    raw = wire_bytes(encode_chunk(layout, 0, torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)))
    header = to_pb(encode_chunk(layout, 0, torch.zeros(2, 2, 9, 8), torch.zeros(2, 2, 9, 8))).chunk
    header.ClearField("data")
    body = header.SerializeToString() + b"\x6a\x02ab" + b"\x6a\x01c"  # data twice: the last one counts
    # the chunk twice (protobuf merges them), data twice, truncated, a bad wire type, garbage, nothing
    odd = [raw + raw, b"\x12" + bytes([len(body)]) + body, raw[:-1], b"\x12\x02\x6f\x00", b"\xff\xff\xff", b""]
    for message in odd:
        expected = _outcome(lambda m=message: from_pb(_parse(m)))
        assert _outcome(lambda m=message: parse_wire(m)) == expected, message[:8]
    assert parse_wire(b"\x12" + bytes([len(body)]) + body).data == b"c"


@pytest.mark.parametrize("checksum", CHECKSUMS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("token_offset", [0, 4])
def test_a_chunk_encoded_into_a_buffer_equals_its_encoded_bytes(checksum: str, dtype: str, token_offset: int) -> None:
    """The shm transport encodes raw chunks straight into the segment (ChunkSource.encode_into):
    the bytes, checksum and shape must be those of `encode`, for a partial last token range too."""
    layout = KvLayout("r", "fp", 3, 2, 8, 14 + token_offset, 4, 3, dtype, checksum=checksum, token_start=token_offset)
    keys, values = (torch.randn(3, 2, 14, 8).to(DTYPES[dtype]) for _ in range(2))
    for index in range(layout.chunk_count):
        source = ChunkSource(layout, index, keys, values, token_offset)
        encoded = source.encode()
        buffer = bytearray(source.byte_length)
        placed = source.encode_into(memoryview(buffer))
        assert bytes(buffer) == encoded.data and placed.byte_length == encoded.byte_length == len(buffer)
        assert (placed.crc32, placed.crc32c, placed.shape) == (encoded.crc32, encoded.crc32c, encoded.shape)


def test_only_a_raw_chunk_of_the_right_size_is_encoded_into_a_buffer() -> None:
    source = ChunkSource(KvLayout("r", "fp", 1, 1, 4, 4, 4, 1, "float32", FP8_ENCODING), 0,
                         torch.ones(1, 1, 4, 4), torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="raw chunk"):
        source.encode_into(memoryview(bytearray(source.byte_length)))
    raw = dataclasses.replace(source, layout=dataclasses.replace(source.layout, encoding=RAW_ENCODING))
    with pytest.raises(ValueError, match="raw chunk"):
        raw.encode_into(memoryview(bytearray(raw.byte_length - 1)))
    short = dataclasses.replace(raw, keys=torch.ones(1, 1, 3, 4), values=torch.ones(1, 1, 3, 4))
    with pytest.raises(ValueError, match="do not make chunk 0"):  # stack would resize its output instead
        short.encode_into(memoryview(bytearray(raw.byte_length)))
    float64 = dataclasses.replace(raw, keys=torch.ones(1, 1, 4, 4, dtype=torch.float64),
                                  values=torch.ones(1, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="float64"):  # copy_ would cast it silently
        float64.encode_into(memoryview(bytearray(raw.byte_length)))
