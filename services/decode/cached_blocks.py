"""The decode worker's prefix cache: pool blocks that hold a named prompt block (a chained hash over
its tokens and every token before it, see services/common/prefix_keys.py), kept after their
sequences end so that the next request with the same prefix takes them instead of receiving them.

A cached block is either in use (some sequence's table holds it: reference count > 0) or
evictable (no sequence holds it). Evictable blocks count as free: admission, the reject threshold
and preemption see them as room, and the BlockManager takes them (least recently used first) only
when its free list is empty, so they go before any running sequence is preempted.
Only complete, verified prompt blocks are named (when a sequence's KV has arrived); a block's
tokens never change after that, since a sequence writes only past its prompt's full blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class CachedBlocks:
    def __init__(self, on_evict: Callable[[], None] = lambda: None) -> None:
        self._by_key: dict[str, int] = {}
        self._key_of: dict[int, str] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._on_evict = on_evict
        self.evictions_total = 0
        self.generation = 0  # one more at each flush

    @property
    def cached(self) -> int:
        """Blocks that hold a named prompt block, in use or not."""
        return len(self._key_of)

    @property
    def evictable(self) -> int:
        """Cached blocks no sequence holds."""
        return len(self._evictable)

    def match(self, keys: list[str]) -> list[int]:
        """The blocks of the longest run of leading keys that are cached."""
        blocks = []
        for key in keys:
            if (block := self._by_key.get(key)) is None:
                break
            blocks.append(block)
        return blocks

    def is_evictable(self, block: int) -> bool:
        return block in self._evictable

    def claim(self, block: int) -> None:
        """A sequence takes a block: no longer evictable (a no-op for one in use)."""
        self._evictable.pop(block, None)

    def release(self, block: int) -> bool:
        """The last holder let a block go: True if it stays, cached and evictable (the most recently
        used); False if it is not cached and goes back to the free list."""
        if block not in self._key_of:
            return False
        self._evictable[block] = None
        return True

    def evict(self) -> int | None:
        """The least recently used evictable block, forgotten (None if there is none)."""
        if not self._evictable:
            return None
        block, _ = self._evictable.popitem(last=False)
        del self._by_key[self._key_of.pop(block)]
        self.evictions_total += 1
        self._on_evict()
        return block

    def name(self, blocks: list[int], keys: list[str]) -> None:
        """Blocks (in use) that now hold complete prompt blocks with these keys. A key already cached
        in another block keeps that block; a block keeps its first name."""
        for block, key in zip(blocks, keys):
            if key not in self._by_key and block not in self._key_of:
                self._by_key[key] = block
                self._key_of[block] = key

    def flush(self) -> list[int]:
        """Forget every name: returns the evictable blocks (for the free list); blocks in use go
        back to the pool as plain blocks when their sequences end."""
        freed = list(self._evictable)
        self.generation += 1
        self._evictable.clear()
        self._by_key.clear()
        self._key_of.clear()
        return freed
