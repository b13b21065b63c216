"""Receiving one KV transfer: the KvAssembler validates its messages in order (layout, chunks, end)
and puts each verified chunk into its KvTarget (the decode's paged pool). The chunks' format and
encoding are kv_codec's."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from services.common import kv_fp8
from services.common.errors import KvCorrupted, KvProtocolError, ModelMismatch
from services.common.kv_codec import (
    CRC32,
    CRC32C,
    FP8_ENCODING,
    RAW_ENCODING,
    ChunkSpan,
    KvChunk,
    KvEnd,
    KvLayout,
    all_finite,
    checksum_matches,
    value_bytes,
)
from services.common.kv_ingest import IngestVerdict
from services.common.runtime import DTYPES, ModelGeometry


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
        self._one_pass = target if isinstance(target, OnePassKvTarget) else None  # checked once, not per chunk
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
        expected_bytes = math.prod(shape) * value_bytes(layout)
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
        if layout.checksum == CRC32C and self._one_pass is not None:
            fp8_scales = bytes(chunk.scales) if chunk.encoding == FP8_ENCODING else None
            verdict = self._one_pass.store_unverified(span, chunk.data, layout.shape(span), self._limits.check_finite,
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
