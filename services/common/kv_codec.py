"""The KV chunk codec: how a request's KV cache is cut into chunks, encoded as raw tensor bytes
(or fp8 with scales, `kv_fp8`), and validated and reassembled on the receiving side.

A transfer is: one KvLayout, chunks 0..n-1 in index order, one KvEnd. Chunks run layer group
first, then token range, so the prefill can send a layer group as soon as its forward pass
finished those layers. Domain objects here; `kv_wire` converts them to and from protobuf.
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import google_crc32c
import numpy
import torch

from services.common import kv_fp8
from services.common.errors import KvCorrupted, KvProtocolError, ModelMismatch
from services.common.kv_ingest import IngestVerdict
from services.common.runtime import DTYPES, ModelGeometry

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


def encode_chunk(layout: KvLayout, index: int, keys: torch.Tensor, values: torch.Tensor,
                 token_offset: int = 0) -> KvChunk:
    """Chunk `index` from the layer group's keys and values, each [layers, kv_heads, tokens, head_dim]
    covering the group's tokens from `token_offset` on."""
    span = layout.span(index)
    tokens = slice(span.token_start - token_offset, span.token_end - token_offset)
    kv = torch.stack([keys[:, :, tokens], values[:, :, tokens]], dim=1)
    scales = b""
    if layout.encoding == FP8_ENCODING:
        data, scales = kv_fp8.quantize(kv, f"KV chunk {index} (layers {span.layer_start}-{span.layer_end - 1}, "
                                           f"tokens {span.token_start}-{span.token_end - 1})")
    else:
        data = tensor_bytes(kv)
    crc32, crc32c = ((zlib.crc32(scales, zlib.crc32(data)), 0) if layout.checksum == CRC32
                     else (0, google_crc32c.extend(google_crc32c.value(data), scales)))
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


@dataclass(frozen=True, slots=True)
class KvReceipt:
    """A complete, verified KV transfer (its tensors are already in the target)."""

    first_token: int
    byte_count: int
    forward_end_unix_nanos: int
    choice_first_tokens: tuple[int, ...] = ()  # sampling.n > 1: choices 1 .. n-1
    encoding: str = RAW_ENCODING  # of the chunks it came in (fp8: lossy)
    token_start: int = 0  # first token the chunks carried (the receiver held the ones before)


def check_token_start(layout: KvLayout, held_tokens: int) -> None:
    """A transfer may leave out only leading tokens the receiver already holds (KvProtocolError)."""
    if layout.token_start > held_tokens:
        raise KvProtocolError(f"the KV transfer starts at token {layout.token_start}, but this worker holds only "
                              f"the first {held_tokens} tokens of {layout.request_id!r}'s prompt")


class KvTarget(Protocol):
    """Where an assembler puts verified chunk data: [layers, 2, kv_heads, tokens, head_dim]."""

    def store(self, span: ChunkSpan, tensor: torch.Tensor) -> None: ...


@runtime_checkable
class OnePassKvTarget(KvTarget, Protocol):
    """A target that can take a chunk's bytes while they are checked (kv_ingest): one that no one
    reads before the transfer is complete. None from `store_unverified`: it cannot this time."""

    def store_unverified(self, span: ChunkSpan, data: bytes | memoryview, shape: tuple[int, ...],
                         check_finite: bool, fp8_scales: bytes | None = None) -> IngestVerdict | None: ...


@dataclass(frozen=True, slots=True)
class AssemblyLimits:
    """What a receiving worker accepts: the largest chunk, and whether chunk values must be finite
    (a NaN or infinity that passed its CRC would poison every sequence of a batch)."""

    max_chunk_bytes: int
    check_finite: bool = True


class KvAssembler:
    """Validates one request's transfer message by message and assembles the KV cache.

    Raises KvProtocolError (malformed, out of order, duplicate, mis-shaped, oversized, a first
    token outside the vocabulary), ModelMismatch (another model's KV) or KvCorrupted (checksum,
    non-finite values, missing chunks). Errors of the target (a revoked lease) pass through.
    """

    def __init__(self, request_id: str, geometry: ModelGeometry, num_tokens: int, limits: AssemblyLimits,
                 target: KvTarget, held_tokens: int = 0) -> None:
        self._request_id = request_id
        self._geometry = geometry
        self._num_tokens = num_tokens
        self._held_tokens = held_tokens  # leading tokens the target holds already: chunks may start there
        self._limits = limits
        self._target = target
        self._layout: KvLayout | None = None
        self.next_index = 0
        self.bytes_received = 0

    def accept_layout(self, layout: KvLayout) -> None:
        if self._layout is not None:
            raise KvProtocolError("KV layout sent twice")
        self._check_request(layout.request_id)
        self._check_model(layout.model_fingerprint)
        geometry = self._geometry
        expected = (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, geometry.dtype)
        if (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype) != expected:
            raise ModelMismatch(f"KV layout (layers, kv_heads, head_dim, dtype) "
                                f"{(layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype)} "
                                f"does not match this worker's {expected}")
        if layout.num_tokens != self._num_tokens:
            raise KvProtocolError(f"KV layout covers {layout.num_tokens} tokens, the prompt has {self._num_tokens}")
        check_token_start(layout, self._held_tokens)
        self._layout = layout

    def accept_chunk(self, chunk: KvChunk) -> None:
        self.verify_and_store(chunk, self.admit_chunk(chunk))

    def admit_chunk(self, chunk: KvChunk) -> ChunkSpan:
        """The checks of the chunk's description (cheap; in arrival order): it takes the next
        position. Its bytes still need `verify_and_store`, which may run in another thread, one
        chunk at a time, while the next chunk is received."""
        layout = self._require_layout()
        self._check_request(chunk.request_id)
        self._check_model(chunk.model_fingerprint)
        self._check_position(layout, chunk.index)
        span, shape = layout.span(chunk.index), layout.shape(layout.span(chunk.index))
        if chunk.span != span:
            raise KvProtocolError(f"KV chunk {chunk.index} covers {chunk.span}, expected {span}")
        if (chunk.dtype, chunk.encoding) != (layout.dtype, layout.encoding):
            raise KvProtocolError(f"KV chunk {chunk.index} is {chunk.dtype}/{chunk.encoding}, "
                                  f"expected {layout.dtype}/{layout.encoding}")
        if chunk.shape != shape:
            raise KvProtocolError(f"KV chunk {chunk.index} has shape {list(chunk.shape)}, expected {list(shape)}")
        if chunk.byte_length > self._limits.max_chunk_bytes:
            raise KvProtocolError(f"KV chunk {chunk.index} is {chunk.byte_length} bytes, "
                                  f"over the {self._limits.max_chunk_bytes}-byte limit")
        fp8 = layout.encoding == FP8_ENCODING
        expected_bytes = math.prod(shape) * (1 if fp8 else DTYPES[layout.dtype].itemsize)
        if not chunk.byte_length == len(chunk.data) == expected_bytes:
            raise KvProtocolError(f"KV chunk {chunk.index} carries {len(chunk.data)} bytes (declares "
                                  f"{chunk.byte_length}), its shape needs {expected_bytes}")
        if fp8:
            kv_fp8.check_scale_bytes(chunk.scales, shape, f"KV chunk {chunk.index}")
        elif chunk.scales:
            raise KvProtocolError(f"KV chunk {chunk.index} is raw but carries {len(chunk.scales)} bytes of scales")
        self.next_index += 1
        return span

    def verify_and_store(self, chunk: KvChunk, span: ChunkSpan) -> None:
        """Checksum and finiteness of an admitted chunk's bytes, then its write into the target (a
        CRC-32C chunk into a one-pass target: all three at once, fp8 scales checked in between)."""
        layout = self._require_layout()
        if layout.checksum == CRC32C and isinstance(self._target, OnePassKvTarget):
            fp8_scales = bytes(chunk.scales) if chunk.encoding == FP8_ENCODING else None
            verdict = self._target.store_unverified(span, chunk.data, layout.shape(span), self._limits.check_finite,
                                                    fp8_scales)
            if verdict is not None:
                self._judge(chunk, verdict.crc32c == chunk.crc32c, True)
                if fp8_scales is not None:
                    kv_fp8.check_scales(fp8_scales, f"KV chunk {chunk.index}")
                self._judge(chunk, True, verdict.finite)
                self.bytes_received += chunk.byte_length
                return
        if not checksum_matches(layout.checksum, chunk):
            self._judge(chunk, False, True)
        if chunk.encoding == FP8_ENCODING:
            tensor = kv_fp8.dequantize(chunk.data, chunk.scales, layout.shape(span), DTYPES[chunk.dtype],
                                       f"KV chunk {chunk.index}")
        else:
            with warnings.catch_warnings():  # frombuffer warns on read-only bytes; we only read them
                warnings.simplefilter("ignore", UserWarning)
                tensor = torch.frombuffer(chunk.data, dtype=DTYPES[chunk.dtype]).view(layout.shape(span))
        self._judge(chunk, True, not self._limits.check_finite or all_finite(tensor))
        self._target.store(span, tensor)
        self.bytes_received += chunk.byte_length

    def _judge(self, chunk: KvChunk, checksum_matched: bool, finite: bool) -> None:
        if not checksum_matched:
            kind = "CRC-32" if self._require_layout().checksum == CRC32 else "CRC-32C"
            raise KvCorrupted(f"KV chunk {chunk.index} fails its {kind} check")
        if not finite:
            raise KvCorrupted(f"KV chunk {chunk.index} holds values that are not finite (NaN or infinity)")

    def finish(self, end: KvEnd) -> KvReceipt:
        layout = self._require_layout()
        self._check_request(end.request_id)
        if end.chunk_count != layout.chunk_count:
            raise KvProtocolError(f"KV end declares {end.chunk_count} chunks, the layout has {layout.chunk_count}")
        for token in (end.first_token, *end.choice_first_tokens):
            if not 0 <= token < self._geometry.vocab_size:
                raise KvProtocolError(f"KV end's first token {token} is outside the model's vocabulary "
                                      f"of {self._geometry.vocab_size}")
        self.check_complete()
        return KvReceipt(end.first_token, self.bytes_received, end.forward_end_unix_nanos, end.choice_first_tokens,
                         layout.encoding, layout.token_start)

    def check_complete(self) -> None:
        layout = self._require_layout()
        if self.next_index != layout.chunk_count:
            raise KvCorrupted(f"KV incomplete: received {self.next_index} of {layout.chunk_count} chunks")

    def _require_layout(self) -> KvLayout:
        if self._layout is None:
            raise KvProtocolError("KV transfer must start with a layout")
        return self._layout

    def _check_request(self, request_id: str) -> None:
        if request_id != self._request_id:
            raise KvProtocolError(f"KV message for request {request_id!r} in the transfer of {self._request_id!r}")

    def _check_model(self, fingerprint: str) -> None:
        if fingerprint != self._geometry.fingerprint:
            raise ModelMismatch(f"KV computed by model {fingerprint!r}, this worker serves "
                                f"{self._geometry.fingerprint!r}")

    def _check_position(self, layout: KvLayout, index: int) -> None:
        if index >= layout.chunk_count:
            raise KvProtocolError(f"KV chunk index {index} is out of range (layout has {layout.chunk_count})")
        if index < self.next_index:
            raise KvProtocolError(f"KV chunk {index} is a duplicate")
        if index > self.next_index:
            raise KvProtocolError(f"KV chunk {index} arrived before chunk {self.next_index}: "
                                  "chunks must arrive in index order")
