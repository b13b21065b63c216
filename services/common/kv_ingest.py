"""Receiving a KV chunk in one pass (kv_ingest.c): its CRC-32C, its finiteness check and its
scatter into the decode's pool rows (an fp8 chunk dequantized on the way into a float32 pool),
reading the chunk's bytes once, straight from the message or the shared-memory segment they
arrived in.

The Python path reads them three times (the checksum, a min/max for finiteness, the transposing
copy into blocks): measured on the development machine for a 2,048-token prompt's 94 MB, 20 ms of
the receiving side's CPU against 8 ms in one pass (`python -m services.bench.ingest`; fp8: 81
against 14 ms; the Python passes took ~55 ms on a loaded machine). `make bench-transfer` shows
what it buys end to end.

The pass writes before it verifies, so it only writes into blocks that no one reads until the
transfer is complete and verified: a sequence's own, under its lease (blocks.LeasedWriter). A chunk
that fails either check fails the transfer, whose blocks are freed or written again by its retry.
Built like every C source of the project (native_build); without a compiler the Python path runs.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from services.common import kv_fp8
from services.common.errors import InternalFailure
from services.common.native_build import compiled

log = logging.getLogger(__name__)

MODES = ("auto", "native", "python")
SOURCE = Path(__file__).with_name("kv_ingest.c")
_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_FP8_TO_FLOAT32 = 3
MAX_FP8_HEAD_DIM = 1024  # MAX_FP8_ROW in the source
_POINTER_BYTES = ctypes.sizeof(ctypes.c_void_p)
_SCALE_BYTES = 4  # a float32 scale, as the kernel reads them


@dataclass(frozen=True, slots=True)
class IngestVerdict:
    """What the pass found: the chunk's CRC-32C, and whether every value is finite (True when
    the check was off)."""

    crc32c: int
    finite: bool


class NativeIngest:
    """The compiled pass."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._kernel = library.kv_ingest
        self._kernel.restype = ctypes.c_int
        self._kernel.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 3
                                 + [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p])
        self.folds = bool(library.kv_ingest_folds())  # the CRC by carry-less multiplication (VPCLMULQDQ)

    @staticmethod
    def build(cache_dir: Path, mode: str) -> NativeIngest | None:
        """The pass (`mode` auto: None where it cannot be built, logged; native: raise instead;
        python: None)."""
        if mode not in MODES:
            raise ValueError(f"kv_ingest must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "python":
            return None
        built = compiled(SOURCE, "kv_ingest", [], cache_dir)
        if isinstance(built, ctypes.CDLL):
            native = NativeIngest(built)
            log.info("KV chunks are received in one native pass (%s; CRC-32C %s)", built._name,
                     "by folding" if native.folds else "by the CRC instruction or a table")
            return native
        if mode == "native":
            raise ValueError(f"--kv-ingest native cannot be used here: {built}")
        log.info("KV chunks are received by the Python path (the native pass cannot be built: %s)", built)
        return None

    def ingest(self, data: bytes | memoryview, shape: tuple[int, ...],
               layers: Sequence[tuple[torch.Tensor, torch.Tensor]], rows: numpy.ndarray,
               check_finite: bool, fp8_scales: bytes | None = None, crc: int = 0) -> IngestVerdict:
        """Chunk `data` [layers, 2, kv_heads, tokens, head_dim] into the pool: token t of the chunk
        goes to row rows[t] (block * block_size + offset; -1: not written) of each layer's keys and
        values [blocks, block_size, kv_heads, head_dim]. With `fp8_scales` the data is fp8 (see
        kv_fp8; float32 pools only). The verdict's checksum is that of the bytes before (whose
        CRC-32C is `crc`: a chunk can go in parts) followed by `data`; an fp8 chunk's scales, which
        its checksum covers too, are the caller's to add."""
        return self.prepare(data, shape, layers, rows, check_finite, fp8_scales).run(0, shape[0], crc)

    def prepare(self, data: bytes | memoryview, shape: tuple[int, ...],
                layers: Sequence[tuple[torch.Tensor, torch.Tensor]], rows: numpy.ndarray,
                check_finite: bool, fp8_scales: bytes | None = None) -> IngestCall:
        """The pass over a chunk (arguments as `ingest`), checked once, to run a few layers at a time."""
        return IngestCall(self._kernel, data, shape, layers, rows, check_finite, fp8_scales)


class IngestCall:
    """One chunk's pass, its pointers and sizes checked (_check_layout) and its arguments built
    once: `run` is one kernel call a part. Holds the chunk's bytes until dropped."""

    def __init__(self, kernel: Callable[..., int], data: bytes | memoryview, shape: tuple[int, ...],
                 layers: Sequence[tuple[torch.Tensor, torch.Tensor]], rows: numpy.ndarray, check_finite: bool,
                 fp8_scales: bytes | None) -> None:
        self._kernel = kernel
        self._source = numpy.frombuffer(data, numpy.uint8)
        pools = [tensor for pair in layers for tensor in pair]
        self._kind = _check_layout(self._source, shape, pools, rows, fp8_scales)
        self._scales = (None if fp8_scales is None  # little-endian on the wire, native for the kernel
                        else numpy.frombuffer(fp8_scales, kv_fp8.SCALE_WIRE_DTYPE).astype(numpy.float32))
        self._pools = pools  # the kernel writes through their pointers: they live as long as the call
        self._bases = (ctypes.c_void_p * len(pools))(*(tensor.data_ptr() for tensor in pools))
        rows = self._rows = rows.copy()  # as checked: a caller's later change cannot move a write
        self._addresses = (self._source.ctypes.data, ctypes.addressof(self._bases), rows.ctypes.data,
                           None if self._scales is None else self._scales.ctypes.data)
        self._shape = shape
        self._check_finite = int(check_finite)
        self._layer_bytes = self._source.size // shape[0]
        self._layer_scales = 2 * shape[2]  # per layer: key/value x kv head

    def run(self, first: int, end: int, crc: int = 0) -> IngestVerdict:
        """Layers [first, end) of the chunk, continuing the checksum `crc` of the bytes before them."""
        if not 0 <= first < end <= self._shape[0]:
            raise InternalFailure(f"KV ingest: layers [{first}, {end}) of a chunk of {self._shape[0]}")
        _, _, heads, tokens, head_dim = self._shape
        source, bases, rows, scales = self._addresses
        status = self._kernel(source + first * self._layer_bytes, end - first, heads, tokens, head_dim,
                              bases + 2 * first * _POINTER_BYTES, rows,
                              None if scales is None else scales + first * self._layer_scales * _SCALE_BYTES,
                              self._kind, self._check_finite, crc, ctypes.byref(checksum := ctypes.c_uint32()))
        if status < 0:
            raise InternalFailure(f"KV ingest refused its inputs (status {status})")
        return IngestVerdict(checksum.value, status == 0)


def _check_layout(source: numpy.ndarray, shape: tuple[int, ...], pools: list[torch.Tensor],
                  rows: numpy.ndarray, fp8_scales: bytes | None) -> int:
    """The pass trusts its pointers: every size it reads and every row it writes is checked here."""
    if len(shape) != 5 or shape[1] != 2 or len(pools) != 2 * shape[0] or not pools:
        raise InternalFailure(f"KV ingest: chunk shape {shape} does not match {len(pools)} pool tensors")
    layers, _, heads, tokens, head_dim = shape
    first = pools[0]
    capacity = first.shape[0] * first.shape[1] if first.dim() == 4 else 0
    if not (first.dtype in _KINDS and all(
            t.device.type == "cpu" and t.is_contiguous() and t.dtype == first.dtype and t.shape == first.shape
            for t in pools) and first.dim() == 4 and tuple(first.shape[2:]) == (heads, head_dim)):
        raise InternalFailure("KV ingest: the pool is not laid out as the chunk's rows")
    fp8 = fp8_scales is not None
    if fp8_scales is not None and (first.dtype != torch.float32 or head_dim > MAX_FP8_HEAD_DIM
                or len(fp8_scales) != kv_fp8.scale_count(shape) * kv_fp8.SCALE_WIRE_DTYPE.itemsize):
        raise InternalFailure("KV ingest: fp8 needs a float32 pool and one scale per layer, key/value and kv head")
    if source.size != math.prod(shape) * (1 if fp8 else first.element_size()):
        raise InternalFailure(f"KV ingest: {source.size} bytes for a chunk of shape {shape}")
    if not (rows.dtype == numpy.int64 and rows.flags.c_contiguous and rows.shape == (tokens,)
            and (tokens == 0 or (rows.min() >= -1 and rows.max() < capacity))):
        raise InternalFailure("KV ingest: a chunk row outside the pool")
    return _FP8_TO_FLOAT32 if fp8 else _KINDS[first.dtype]
