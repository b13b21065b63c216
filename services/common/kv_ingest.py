"""Receiving a raw KV chunk in one pass (kv_ingest.c): its CRC-32C, its finiteness check and its
scatter into the decode's pool rows, reading the chunk's bytes once, straight from the message or
the shared-memory segment they arrived in.

The Python path reads them three times (the checksum, a min/max for finiteness, the transposing
copy into blocks): measured on the development machine, ~45 ms of the receiving side's CPU for a
2,048-token prompt's 94 MB, against ~8 ms in one pass (`make bench-transfer` shows what it buys).

The pass writes before it verifies, so it only writes into blocks that no one reads until the
transfer is complete and verified: a sequence's own, under its lease (blocks.LeasedWriter). A chunk
that fails either check fails the transfer, whose blocks are freed or written again by its retry.
Built like every C source of the project (native_build); without a compiler the Python path runs.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from services.common.errors import InternalFailure
from services.common.native_build import compiled

log = logging.getLogger(__name__)

MODES = ("auto", "native", "python")
SOURCE = Path(__file__).with_name("kv_ingest.c")
_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


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
        self._kernel.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 2
                                 + [ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_void_p])

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
            log.info("KV chunks are received in one native pass (%s)", built._name)
            return NativeIngest(built)
        if mode == "native":
            raise ValueError(f"--kv-ingest native cannot be used here: {built}")
        log.info("KV chunks are received by the Python path (the native pass cannot be built: %s)", built)
        return None

    def ingest(self, data: bytes | memoryview, shape: tuple[int, ...],
               layers: Sequence[tuple[torch.Tensor, torch.Tensor]], rows: numpy.ndarray,
               check_finite: bool) -> IngestVerdict:
        """Chunk `data` [layers, 2, kv_heads, tokens, head_dim] into the pool: token t of the chunk
        goes to row rows[t] (block * block_size + offset; -1: not written) of each layer's keys and
        values [blocks, block_size, kv_heads, head_dim]."""
        source = numpy.frombuffer(data, numpy.uint8)
        pools = [tensor for pair in layers for tensor in pair]
        kind = _check_layout(source, shape, pools, rows)
        bases = (ctypes.c_void_p * len(pools))(*(tensor.data_ptr() for tensor in pools))
        crc = ctypes.c_uint32()
        _, _, heads, tokens, head_dim = shape
        row_bytes = head_dim * pools[0].element_size()
        status = self._kernel(source.ctypes.data, shape[0], heads, tokens, row_bytes, ctypes.addressof(bases),
                              rows.ctypes.data, heads * row_bytes, kind, int(check_finite), ctypes.byref(crc))
        if status < 0:
            raise InternalFailure(f"KV ingest refused its inputs (status {status})")
        return IngestVerdict(crc.value, status == 0)


def _check_layout(source: numpy.ndarray, shape: tuple[int, ...], pools: list[torch.Tensor],
                  rows: numpy.ndarray) -> int:
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
    if source.size != math.prod(shape) * first.element_size():
        raise InternalFailure(f"KV ingest: {source.size} bytes for a chunk of shape {shape}")
    if not (rows.dtype == numpy.int64 and rows.flags.c_contiguous and rows.shape == (tokens,)
            and (tokens == 0 or (rows.min() >= -1 and rows.max() < capacity))):
        raise InternalFailure("KV ingest: a chunk row outside the pool")
    return _KINDS[first.dtype]
