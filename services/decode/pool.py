"""The decode worker's KV storage: per layer, keys and values of every block of the paged pool
([num_blocks, block_size, kv_heads, head_dim]: a gathered run of blocks is already a [tokens,
kv_heads, head_dim] sequence, no second copy needed). Which block belongs to whom is blocks.py's."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy
import torch

from services.common.kv_codec import ChunkSpan
from services.common.kv_ingest import MAX_FP8_HEAD_DIM, IngestCall, NativeIngest
from services.common.runtime import DTYPES, ModelGeometry


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Size of the pool: `num_blocks` blocks of `block_size` tokens."""

    num_blocks: int
    block_size: int

    def __post_init__(self) -> None:
        if self.num_blocks <= 0 or self.block_size <= 0:
            raise ValueError(f"KV pool needs num_blocks > 0 and block_size > 0, got {self}")

    @staticmethod
    def from_megabytes(megabytes: float, block_size: int, geometry: ModelGeometry) -> PoolConfig:
        block_bytes = geometry.kv_bytes_per_token * block_size
        return PoolConfig(max(1, int(megabytes * 1024 * 1024) // block_bytes), block_size)


class BlockPool:
    """The storage: per layer, keys and values of every block."""

    def __init__(self, config: PoolConfig, geometry: ModelGeometry, device: torch.device,
                 ingest: NativeIngest | None = None) -> None:
        shape = (config.num_blocks, config.block_size, geometry.num_kv_heads, geometry.head_dim)
        dtype = DTYPES[geometry.dtype]
        self.block_size = config.block_size
        self.ingest = ingest if device.type == "cpu" else None  # the native pass writes CPU memory
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(geometry.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(geometry.num_layers)]

    def write(self, blocks: list[int], layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values [kv_heads, tokens, head_dim] of one layer at token positions start.."""
        end = start + keys.shape[1]
        first_full, last_full = -(-start // self.block_size), end // self.block_size
        if first_full < last_full:  # whole blocks in one copy per tensor (a chunk is mostly whole blocks)
            self._write_whole_blocks(blocks[first_full:last_full], layer, first_full * self.block_size - start,
                                     keys, values)
            self._write_rows(blocks, layer, start, keys, values, start, first_full * self.block_size)
            self._write_rows(blocks, layer, start, keys, values, last_full * self.block_size, end)
        else:
            self._write_rows(blocks, layer, start, keys, values, start, end)

    def can_ingest(self, fp8: bool) -> bool:
        """Whether `prepare_ingest` takes a raw chunk (fp8: an fp8 one) here."""
        return self.ingest is not None and (not fp8 or (self.keys[0].dtype == torch.float32
                                                        and self.keys[0].shape[3] <= MAX_FP8_HEAD_DIM))

    def ingest_rows(self, blocks: list[int], span: ChunkSpan, floor: int) -> numpy.ndarray:
        """The pool row of each token of the span (block * block_size + offset), -1 below `floor`."""
        positions = numpy.arange(span.token_start, span.token_end, dtype=numpy.int64)
        rows = numpy.asarray(blocks, dtype=numpy.int64)[positions // self.block_size] * self.block_size
        rows += positions % self.block_size
        rows[positions < floor] = -1
        return rows

    def prepare_ingest(self, rows: numpy.ndarray, span: ChunkSpan, data: bytes | memoryview,
                       shape: tuple[int, ...], check_finite: bool, fp8_scales: bytes | None) -> IngestCall:
        """A chunk's bytes [layers, 2, kv_heads, tokens, head_dim] (fp8 with the chunk's
        `fp8_scales`) into `rows`, in one native pass a layer or more at a time (needs `can_ingest`;
        the scales are not in the checksum)."""
        if self.ingest is None:
            raise RuntimeError("this pool has no native ingest")
        layers = range(span.layer_start, span.layer_end)
        return self.ingest.prepare(data, shape, [(self.keys[layer], self.values[layer]) for layer in layers], rows,
                                   check_finite, fp8_scales)

    def _write_whole_blocks(self, blocks: list[int], layer: int, first_row: int, keys: torch.Tensor,
                            values: torch.Tensor) -> None:
        """Whole blocks, one copy per run of consecutive blocks (a chunk's blocks are mostly one run)."""
        for pool, source in ((self.keys[layer], keys), (self.values[layer], values)):
            tokens = source.transpose(0, 1)  # [tokens, kv_heads, head_dim], the pool's row layout
            for index, first, count in block_runs(blocks):
                rows = first_row + index * self.block_size
                copy_rows(pool[first : first + count].flatten(0, 1), tokens[rows : rows + count * self.block_size])

    def _write_rows(self, blocks: list[int], layer: int, start: int, keys: torch.Tensor, values: torch.Tensor,
                    position: int, end: int) -> None:
        """Token positions [position, end) of keys/values that begin at `start`, block piece by piece."""
        while position < end:
            block, offset = divmod(position, self.block_size)
            take = min(self.block_size - offset, end - position)
            rows = slice(position - start, position - start + take)
            self.keys[layer][blocks[block], offset : offset + take] = keys[:, rows].transpose(0, 1)
            self.values[layer][blocks[block], offset : offset + take] = values[:, rows].transpose(0, 1)
            position += take

    def copy_block(self, source: int, target: int) -> None:
        """Every layer's keys and values of block `source` into block `target`."""
        for tensors in (self.keys, self.values):
            for layer in tensors:
                copy_rows(layer[target], layer[source])

    def read(self, blocks: list[int], layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [kv_heads, length, head_dim] of one layer of a sequence."""
        index = torch.tensor(blocks, device=self.keys[layer].device)
        keys = self.keys[layer].index_select(0, index).flatten(0, 1)[:length].transpose(0, 1)
        values = self.values[layer].index_select(0, index).flatten(0, 1)[:length].transpose(0, 1)
        return keys, values


def block_runs(blocks: list[int]) -> Iterator[tuple[int, int, int]]:
    """(index in `blocks`, first block, count) of each run of consecutive block numbers."""
    index = 0
    while index < len(blocks):
        count = 1
        while index + count < len(blocks) and blocks[index + count] == blocks[index] + count:
            count += 1
        yield index, blocks[index], count
        index += count


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def copy_rows(target: torch.Tensor, source: torch.Tensor) -> None:
    """target[:] = source, bit for bit. On the CPU numpy copies, on the calling thread alone and
    without the GIL: torch would split the copy over every intra-op thread, and a thread of the
    split that waits for a core (the event loop, a decode step, the sender) holds up the rest;
    measured, that made receiving a transfer 1.7x slower on two busy cores."""
    if target.device.type != "cpu" or source.device.type != "cpu":
        target.copy_(source)
        return
    width = _SAME_WIDTH_INT[target.element_size()]
    numpy.copyto(target.view(width).numpy(), source.view(width).numpy())
