"""Who holds which blocks of the decode worker's paged KV pool (pool.py holds the tensors).

KV lives in fixed-size blocks of `block_size` tokens. The BlockManager hands blocks to sequences
and takes them back; usage (used / total blocks) is exact, and is the worker's KV pressure. Every
reservation carries a lease, and every writer proves it still holds one (see BlockManager). The
choices of one request (sampling.n) share their prompt's full blocks, counted by reference; each
choice has its own copy of the prompt's last, partial block, the only prompt block it writes into.
With the prefix cache on, full prompt blocks are also named and kept after their sequences end
(cached_blocks.py): a new sequence starts with the cached blocks of its prompt's longest cached
prefix, shared by reference, and the transfer writes only the rest.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import google_crc32c
import torch

from services.common.errors import CapacityExhausted, RequestCancelled
from services.common.kv_codec import ChunkSpan
from services.common.kv_ingest import IngestVerdict
from services.decode.cached_blocks import CachedBlocks
from services.decode.pool import BlockPool, PoolConfig


class LeaseRevoked(RequestCancelled):
    """A write on a lease that was revoked: the request was released, or a newer writer took over."""


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to write into one owner's blocks. Valid until the owner's blocks are freed or a
    newer lease supersedes it (a retried transfer, a resume); epochs never repeat."""

    owner: str
    epoch: int


class BlockManager:
    """Which blocks belong to which sequence, and who may write into them.

    Writers (chunk assembly on the event loop, local prefills and swap-ins on the model thread)
    write under `writing(lease)`, which holds a lock while it checks the lease and the write runs;
    `free` takes the same lock, so no write can land in blocks that were freed and handed on. The
    decode step writes without a lease: the scheduler never frees a sequence while it is in a step.
    """

    def __init__(self, config: PoolConfig, cache: CachedBlocks | None = None) -> None:
        self.block_size = config.block_size
        self.cache = cache  # the prefix cache (None: off); its evictable blocks count as free
        self.total = config.num_blocks
        self._free = list(range(config.num_blocks - 1, -1, -1))
        self._refs = [0] * config.num_blocks  # tables holding each block (> 1: shared by choices)
        self._tables: dict[str, list[int]] = {}
        self._epochs: dict[str, int] = {}
        self._next_epoch = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self.total - self.free_blocks

    @property
    def free_blocks(self) -> int:
        return len(self._free) + (self.cache.evictable if self.cache is not None else 0)

    @property
    def pressure(self) -> float:
        return self.used / self.total

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_fit(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= self.free_blocks

    def lookup(self, keys: list[str]) -> list[int]:
        """The cached blocks of the longest run of these leading block keys (none with the cache off)."""
        return [] if self.cache is None else self.cache.match(keys)

    def allocate(self, owner: str, tokens: int, spare: int = 0, cached: list[int] | None = None) -> Lease:
        """Blocks for `tokens` tokens of a new owner: the `cached` leading ones (from `lookup`,
        shared), new ones for the rest, and `spare` more at the table's end for the copies `fork`
        makes; and the lease to write them."""
        if owner in self._tables:
            raise ValueError(f"{owner!r} already holds blocks")
        cached = cached or []
        needed = self.blocks_for(tokens) - len(cached) + spare
        if needed > (available := self.available(cached)):
            raise CapacityExhausted(f"KV pool full: {needed} blocks needed, {available} free")
        with self._lock:
            for block in cached:  # claimed before _take, which may evict
                self._refs[block] += 1
                self.cache.claim(block)  # type: ignore[union-attr]
            self._tables[owner] = cached + self._take(needed)
            return self._grant(owner)

    def available(self, cached: list[int]) -> int:
        """Blocks a new owner can take besides these cached ones (which, when evictable, stop counting
        as free once it takes them)."""
        return self.free_blocks - sum(self._refs[block] == 0 for block in cached)

    def _take(self, count: int) -> list[int]:
        """New blocks (the caller checked there are enough)."""
        taken = [self._next_free() for _ in range(count)]
        for block in taken:
            self._refs[block] = 1
        return taken

    def _next_free(self) -> int:
        """A free block, else the least recently used evictable cached one."""
        if self._free:
            return self._free.pop()
        block = None if self.cache is None else self.cache.evict()
        if block is None:
            raise CapacityExhausted("KV pool full")
        return block

    @property
    def cache_generation(self) -> int:
        return 0 if self.cache is None else self.cache.generation

    def remember(self, owner: str, keys: list[str], generation: int = 0) -> None:
        """The owner's leading blocks hold complete prompt blocks with these keys: cache them, unless
        the cache was flushed since the owner was admitted at `generation` (its KV may be stale)."""
        if self.cache is not None and generation == self.cache.generation:
            self.cache.name(self._tables[owner][: len(keys)], keys)

    def flush(self) -> int:
        """Empty the prefix cache: its evictable blocks go back to the free list (returned: how many)."""
        if self.cache is None:
            return 0
        with self._lock:
            freed = self.cache.flush()
            self._free.extend(freed)
            return len(freed)

    def fork(self, parent: str, child: str, tokens: int) -> tuple[Lease, tuple[int, int] | None]:
        """A new owner sharing the parent's first `tokens` tokens: their full blocks by reference,
        the partial last one as a spare block of the parent's (see `allocate`), which the caller
        fills with a copy; returns the child's lease and that (source, target) copy, if any."""
        if child in self._tables:
            raise ValueError(f"{child!r} already holds blocks")
        with self._lock:
            table, full, held = self._tables[parent], tokens // self.block_size, self.blocks_for(tokens)
            if len(table) < held + (held - full):
                raise CapacityExhausted(f"{parent!r} holds no spare block for another choice")
            shared = table[:full]
            for block in shared:
                self._refs[block] += 1
            copy = None
            if held > full:  # the partial block: the parent's last spare block becomes the child's copy
                copy = (table[full], table.pop())
                shared.append(copy[1])
            self._tables[child] = shared
            return self._grant(child), copy

    def freeable(self, owners: Iterable[str]) -> int:
        """Blocks that go back to the pool once all these owners free their tables (blocks no one
        else shares)."""
        held = Counter(block for owner in set(owners) for block in self._tables.get(owner, ()))
        return sum(count == self._refs[block] for block, count in held.items())

    def renew(self, owner: str) -> Lease:
        """A new lease on the owner's blocks; every older lease is revoked."""
        with self._lock:
            if owner not in self._tables:
                raise LeaseRevoked(f"{owner!r} holds no blocks")
            return self._grant(owner)

    def _grant(self, owner: str) -> Lease:
        self._epochs[owner] = next(self._next_epoch)
        return Lease(owner, self._epochs[owner])

    def holds(self, lease: Lease) -> bool:
        return self._epochs.get(lease.owner) == lease.epoch

    def ensure(self, owner: str, tokens: int) -> bool:
        """Grow the owner's table to hold `tokens` tokens; False (nothing taken) if the pool is short."""
        table = self._tables[owner]
        missing = self.blocks_for(tokens) - len(table)
        if missing > self.free_blocks:
            return False
        table.extend(self._take(max(0, missing)))
        return True

    def table(self, owner: str) -> list[int]:
        """The owner's blocks (for the decode step, which the scheduler keeps them alive through)."""
        return self._tables[owner]

    def holds_blocks(self, owner: str) -> bool:
        return owner in self._tables

    def blocks_of(self, owner: str) -> int:
        return len(self._tables.get(owner, ()))

    @contextmanager
    def writing(self, lease: Lease) -> Iterator[list[int]]:
        """The lease's blocks, locked against `free` while the caller writes into them."""
        with self._lock:
            if not self.holds(lease):
                raise LeaseRevoked(f"the KV blocks of {lease.owner!r} were released or handed to a newer writer")
            yield self._tables[lease.owner]

    def free(self, owner: str) -> int:
        """Give back the owner's blocks no other owner shares (cached ones stay, evictable) and
        revoke its leases (waits for a write in progress); returns how many went back. The last
        block goes first: evicted first, a cached prefix loses its tail before its head."""
        with self._lock:
            table = self._tables.pop(owner, [])
            self._epochs.pop(owner, None)
            released = []
            for block in reversed(table):
                self._refs[block] -= 1
                if self._refs[block] == 0:
                    released.append(block)
            self._free.extend(block for block in released if self.cache is None or not self.cache.release(block))
        return len(released)


class LeasedWriter:
    """Writes one sequence's KV into its blocks; every write checks the lease (LeaseRevoked).
    Positions below `floor` (blocks taken from the prefix cache, shared and never written again)
    are skipped: a transfer or local prefill may cover them too."""

    def __init__(self, pool: BlockPool, blocks: BlockManager, lease: Lease, floor: int = 0) -> None:
        self._pool = pool
        self._blocks = blocks
        self.lease = lease
        self._floor = floor

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keys/values [kv_heads, tokens, head_dim] of one layer at token positions start.."""
        skip = max(0, self._floor - start)
        with self._blocks.writing(self.lease) as table:  # checked even for a write all below the floor
            if skip < keys.shape[1]:
                self._pool.write(table, layer, start + skip, keys[:, skip:], values[:, skip:])

    def store_unverified(self, span: ChunkSpan, data: bytes | memoryview, shape: tuple[int, ...],
                         check_finite: bool, fp8_scales: bytes | None = None) -> IngestVerdict | None:
        """A chunk's bytes (fp8 with `fp8_scales`) written while they are checked, in one pass
        (kv_ingest): safe here, where no one reads the blocks before the transfer is verified. None
        where the pool has no such pass: the caller verifies and calls `store`."""
        if not self._pool.can_ingest(fp8_scales is not None):
            return None
        verdict, call = IngestVerdict(0, True), None
        for offset in range(shape[0]):
            with self._blocks.writing(self.lease) as table:  # a layer at a time, as `write`: `free` waits less
                if call is None:
                    rows = self._pool.ingest_rows(table, span, self._floor)
                    call = self._pool.prepare_ingest(rows, span, data, shape, check_finite, fp8_scales)
                layer = call.run(offset, offset + 1, verdict.crc32c)
                verdict = IngestVerdict(layer.crc32c, verdict.finite and layer.finite)
        if fp8_scales is None:
            return verdict
        return IngestVerdict(google_crc32c.extend(verdict.crc32c, fp8_scales), verdict.finite)

    def store(self, span: ChunkSpan, tensor: torch.Tensor) -> None:
        """A verified chunk [layers, 2, kv_heads, tokens, head_dim] (the assembler's KvTarget)."""
        for offset, layer in enumerate(range(span.layer_start, span.layer_end)):
            self.write(layer, span.token_start, tensor[offset, 0], tensor[offset, 1])
