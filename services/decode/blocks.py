"""The decode worker's paged KV pool.

KV lives in fixed-size blocks of `block_size` tokens, in one tensor per layer for keys and one for
values ([num_blocks, block_size, kv_heads, head_dim]: a gathered run of blocks is already a
[tokens, kv_heads, head_dim] sequence, no second copy needed). The BlockManager hands blocks to sequences
and takes them back; usage (used / total blocks) is exact, and is the worker's KV pressure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.common.errors import CapacityExhausted
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

    def __init__(self, config: PoolConfig, geometry: ModelGeometry, device: torch.device) -> None:
        shape = (config.num_blocks, config.block_size, geometry.num_kv_heads, geometry.head_dim)
        dtype = DTYPES[geometry.dtype]
        self.block_size = config.block_size
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(geometry.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(geometry.num_layers)]

    def write(self, blocks: list[int], layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values [kv_heads, tokens, head_dim] of one layer at token positions start.."""
        position, end = start, start + keys.shape[1]
        while position < end:
            block, offset = divmod(position, self.block_size)
            take = min(self.block_size - offset, end - position)
            rows = slice(position - start, position - start + take)
            self.keys[layer][blocks[block], offset : offset + take] = keys[:, rows].transpose(0, 1)
            self.values[layer][blocks[block], offset : offset + take] = values[:, rows].transpose(0, 1)
            position += take

    def read(self, blocks: list[int], layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [kv_heads, length, head_dim] of one layer of a sequence."""
        index = torch.tensor(blocks, device=self.keys[layer].device)
        keys = self.keys[layer].index_select(0, index).flatten(0, 1)[:length].transpose(0, 1)
        values = self.values[layer].index_select(0, index).flatten(0, 1)[:length].transpose(0, 1)
        return keys, values


class BlockManager:
    """Which blocks belong to which sequence."""

    def __init__(self, config: PoolConfig) -> None:
        self.block_size = config.block_size
        self.total = config.num_blocks
        self._free = list(range(config.num_blocks - 1, -1, -1))
        self.tables: dict[str, list[int]] = {}

    @property
    def used(self) -> int:
        return self.total - len(self._free)

    @property
    def pressure(self) -> float:
        return self.used / self.total

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_fit(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= len(self._free)

    def allocate(self, owner: str, tokens: int) -> list[int]:
        """Blocks for `tokens` tokens of a new owner."""
        table = self.tables.setdefault(owner, [])
        try:
            self.ensure(owner, tokens)
        except CapacityExhausted:
            del self.tables[owner]
            raise
        return table

    def ensure(self, owner: str, tokens: int) -> None:
        """Grow the owner's table to hold `tokens` tokens."""
        table = self.tables[owner]
        missing = self.blocks_for(tokens) - len(table)
        if missing > len(self._free):
            raise CapacityExhausted(f"KV pool full: {missing} more blocks needed, {len(self._free)} free")
        table.extend(self._free.pop() for _ in range(max(0, missing)))

    def free(self, owner: str) -> int:
        table = self.tables.pop(owner, [])
        self._free.extend(reversed(table))
        return len(table)
