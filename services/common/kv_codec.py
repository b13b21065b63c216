"""The KV chunk codec: how a request's KV cache is cut into chunks and encoded as raw tensor bytes
(or fp8 with scales, `kv_fp8`), and the checks of a chunk's bytes; `kv_assembly` validates and
reassembles a transfer on the receiving side.

A transfer is: one KvLayout, chunks 0..n-1 in index order, one KvEnd. Chunks run layer group
first, then token range, so the prefill can send a layer group as soon as its forward pass
finished those layers. Domain objects here; `kv_wire` converts them to and from protobuf.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import google_crc32c
import numpy
import torch

from services.common import kv_fp8
from services.common.errors import KvProtocolError
from services.common.runtime import DTYPES

RAW_ENCODING = "raw"
FP8_ENCODING = kv_fp8.FP8_ENCODING
ENCODINGS = (RAW_ENCODING, FP8_ENCODING)
CRC32 = "crc32"  # zlib's CRC-32 in KvChunk.crc32: what senders that predate checksum kinds send
CRC32C = "crc32c"  # CRC-32C in KvChunk.crc32c, hardware-backed: what this system's prefill sends
CHECKSUMS = (CRC32, CRC32C)


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """Layers [layer_start, layer_end) x tokens [token_start, token_end)."""

    layer_start: int
    layer_end: int
    token_start: int
    token_end: int


@dataclass(frozen=True, slots=True)
class KvLayout:
    """The whole KV cache of one request and how it is cut into chunks."""

    request_id: str
    model_fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_tokens: int
    chunk_tokens: int
    chunk_layers: int
    dtype: str
    encoding: str = RAW_ENCODING
    transfer_attempt: int = 0  # a retried transfer (higher attempt) supersedes an unfinished one
    chunks_in_kvstore: bool = False  # the stream carries layout and end; chunks are in the kvstore
    checksum: str = CRC32C  # which checksum every chunk carries (CHECKSUMS)
    shm_segment: str = ""  # the chunk bytes lie in this shared-memory segment (see kv_shm)
    token_start: int = 0  # the chunks cover tokens [token_start, num_tokens): the decode holds the rest

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_tokens", "chunk_tokens", "chunk_layers"):
            if getattr(self, name) <= 0:
                raise KvProtocolError(f"KV layout {name} must be > 0, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise KvProtocolError(f"KV layout dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.encoding not in ENCODINGS:
            raise KvProtocolError(f"KV encoding {self.encoding!r} is not one of {list(ENCODINGS)}")
        if self.checksum not in CHECKSUMS:
            raise KvProtocolError(f"KV checksum {self.checksum!r} is not one of {CHECKSUMS}")
        if not 0 <= self.token_start < self.num_tokens:
            raise KvProtocolError(f"KV layout token_start must be below num_tokens ({self.num_tokens}), "
                                  f"got {self.token_start}")

    @property
    def token_chunks(self) -> int:
        """Token ranges per layer group: chunk_tokens-aligned, the first starting at token_start."""
        return math.ceil(self.num_tokens / self.chunk_tokens) - self.token_start // self.chunk_tokens

    @property
    def sent_tokens(self) -> int:
        return self.num_tokens - self.token_start

    @property
    def layer_groups(self) -> int:
        return math.ceil(self.num_layers / self.chunk_layers)

    @property
    def chunk_count(self) -> int:
        return self.token_chunks * self.layer_groups

    def span(self, index: int) -> ChunkSpan:
        group, token_chunk = divmod(index, self.token_chunks)
        layer_start = group * self.chunk_layers
        aligned = (self.token_start // self.chunk_tokens + token_chunk) * self.chunk_tokens
        return ChunkSpan(layer_start, min(layer_start + self.chunk_layers, self.num_layers),
                         max(aligned, self.token_start), min(aligned + self.chunk_tokens, self.num_tokens))

    def shape(self, span: ChunkSpan) -> tuple[int, int, int, int, int]:
        return (span.layer_end - span.layer_start, 2, self.num_kv_heads,
                span.token_end - span.token_start, self.head_dim)

    def group_chunks(self, group: int) -> range:
        """Chunk indices of one layer group."""
        return range(group * self.token_chunks, (group + 1) * self.token_chunks)

    def token_range_chunks(self, start: int, end: int) -> range:
        """Chunk indices of the first layer group whose tokens lie in [start, end) (both multiples of
        chunk_tokens, or end = num_tokens): with one layer group, the chunks of that token range."""
        first = self.token_start // self.chunk_tokens
        return range(max(start // self.chunk_tokens - first, 0), max(-(-end // self.chunk_tokens) - first, 0))


def value_bytes(layout: KvLayout) -> int:
    """Bytes of one value in the layout's chunk data: 1 in fp8 (its scales travel beside the
    data), else the dtype's size."""
    return 1 if layout.encoding == FP8_ENCODING else DTYPES[layout.dtype].itemsize


@dataclass(frozen=True, slots=True)
class ShmSlice:
    """Where a chunk's bytes lie in its transfer's shared-memory segment."""

    segment: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class KvChunk:
    request_id: str
    model_fingerprint: str
    index: int
    span: ChunkSpan
    dtype: str
    encoding: str
    shape: tuple[int, ...]
    byte_length: int
    crc32: int  # CRC-32 of data when the layout's checksum is CRC32, else 0
    data: bytes | memoryview  # a view into the message it came in, or the mapped bytes of an shm slice
    crc32c: int = 0  # CRC-32C of data when the layout's checksum is CRC32C, else 0
    shm: ShmSlice | None = None  # the bytes lie in the layout's shared-memory segment, not in data
    scales: bytes = b""  # fp8 only: float32 per (layer, key/value, kv head), see kv_fp8


@dataclass(frozen=True, slots=True)
class KvEnd:
    request_id: str
    chunk_count: int
    first_token: int
    forward_end_unix_nanos: int = 0
    choice_first_tokens: tuple[int, ...] = ()  # sampling.n > 1: the first tokens of choices 1 .. n-1


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor in C order (works for bfloat16 too)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@dataclass(frozen=True, slots=True)
class ChunkSource:
    """Chunk `index` of a transfer before it is encoded: its layer group's keys and values, each
    [layers, kv_heads, tokens, head_dim] covering the group's tokens from `token_offset` on. A sink
    may encode it straight into its own buffer (`encode_into`: a shared-memory segment), else it is
    encoded once into bytes for every sink (`encode`)."""

    layout: KvLayout
    index: int
    keys: torch.Tensor
    values: torch.Tensor
    token_offset: int = 0

    @property
    def byte_length(self) -> int:
        return math.prod(self.layout.shape(self.layout.span(self.index))) * value_bytes(self.layout)

    def encode(self) -> KvChunk:
        return encode_chunk(self.layout, self.index, self.keys, self.values, self.token_offset)

    def encode_into(self, target: memoryview) -> KvChunk:
        """The chunk encoded raw into `target` (byte_length writable bytes; blocking), checksummed
        there: its data is `target`. One copy where `encode` then a copy of its bytes takes two
        (from a GPU's tensors, the device-to-host copy lands in `target` itself)."""
        layout, span = self.layout, self.layout.span(self.index)
        if layout.encoding != RAW_ENCODING or len(target) != self.byte_length:
            raise ValueError(f"encode_into takes a raw chunk and {self.byte_length} bytes")
        keys, values = _kv_rows(self.keys, self.values, span, self.token_offset)
        shape, dtype = layout.shape(span), DTYPES[layout.dtype]
        if keys.shape != values.shape or (keys.shape[0], 2, *keys.shape[1:]) != shape or \
                {keys.dtype, values.dtype} != {dtype}:
            raise ValueError(f"keys and values of shape {tuple(keys.shape)} and dtype {keys.dtype} do not make "
                             f"chunk {self.index} {shape} of {dtype}")
        placed = torch.frombuffer(target, dtype=dtype).view(shape)
        placed[:, 0].copy_(keys)
        placed[:, 1].copy_(values)
        return _chunk(layout, self.index, target, b"")


def _kv_rows(keys: torch.Tensor, values: torch.Tensor, span: ChunkSpan,
             token_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = slice(span.token_start - token_offset, span.token_end - token_offset)
    return keys[:, :, tokens], values[:, :, tokens]


def encode_chunk(layout: KvLayout, index: int, keys: torch.Tensor, values: torch.Tensor,
                 token_offset: int = 0) -> KvChunk:
    """Chunk `index` from the layer group's keys and values, each [layers, kv_heads, tokens, head_dim]
    covering the group's tokens from `token_offset` on."""
    span = layout.span(index)
    kv = torch.stack(_kv_rows(keys, values, span, token_offset), dim=1)
    scales = b""
    if layout.encoding == FP8_ENCODING:
        data, scales = kv_fp8.quantize(kv, f"KV chunk {index} (layers {span.layer_start}-{span.layer_end - 1}, "
                                           f"tokens {span.token_start}-{span.token_end - 1})")
    else:
        data = tensor_bytes(kv)
    return _chunk(layout, index, data, scales)


def _chunk(layout: KvLayout, index: int, data: bytes | memoryview, scales: bytes) -> KvChunk:
    """The chunk with its encoded data and scales, checksummed as the layout says."""
    if layout.checksum == CRC32:
        crc32, crc32c = zlib.crc32(scales, zlib.crc32(data)), 0
    else:
        array = data if isinstance(data, bytes) else numpy.frombuffer(data, numpy.uint8)
        crc32, crc32c = 0, google_crc32c.extend(google_crc32c.value(array), scales)
    span = layout.span(index)
    return KvChunk(layout.request_id, layout.model_fingerprint, index, span, layout.dtype, layout.encoding,
                   layout.shape(span), len(data), crc32, data, crc32c, scales=scales)


def checksum_matches(kind: str, chunk: KvChunk) -> bool:
    """Whether the chunk's data, followed by its scales (fp8), has the checksum of `kind` it declares."""
    scales = bytes(chunk.scales)
    if kind == CRC32:
        return zlib.crc32(scales, zlib.crc32(chunk.data)) == chunk.crc32
    data = chunk.data if isinstance(chunk.data, bytes) else numpy.frombuffer(chunk.data, numpy.uint8)
    # takes bytes or an array, not a memoryview
    return google_crc32c.extend(google_crc32c.value(data), scales) == chunk.crc32c


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in the tensor. Min and max propagate NaN and are infinite if any element
    is (~30x faster than torch.isfinite(tensor).all(), which materializes a mask). On the CPU numpy
    reduces, on the calling thread alone (see blocks.copy_rows for why not torch's thread team);
    numpy has no bfloat16, which torch reduces."""
    if tensor.numel() == 0:
        return True
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float16):
        array = tensor.numpy()
        return bool(numpy.isfinite(array.min())) and bool(numpy.isfinite(array.max()))
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
