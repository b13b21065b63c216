"""The bookkeeping the in-process backends share (memory and shm): which values the store holds, in
insertion order (the oldest is evicted first), with the size and expiry of each, under a byte
budget. The ledger holds a handle per value (the bytes, or a segment name) and hands back every
handle it drops (replaced, expired, evicted, deleted), so that a backend can free what it names."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from services.kvstore.backend import StoreStats

V = TypeVar("V")
EntryKey = tuple[str, str]  # (namespace, key)


@dataclass(slots=True)
class _Entry(Generic[V]):
    handle: V
    size: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class Admission(Generic[V]):
    """What admitting a value dropped: every handle to free, and how many of them were evicted."""

    dropped: list[V]
    evicted: int


class Ledger(Generic[V]):
    def __init__(self, byte_budget: int) -> None:
        self.byte_budget = byte_budget
        self._entries: OrderedDict[EntryKey, _Entry[V]] = OrderedDict()
        self._bytes = 0
        self._evictions = 0

    def _pop(self, entry_key: EntryKey) -> V:
        entry = self._entries.pop(entry_key)
        self._bytes -= entry.size
        return entry.handle

    def sweep(self) -> list[V]:
        """Drop the expired entries."""
        now = time.monotonic()
        return [self._pop(k) for k in [k for k, e in self._entries.items() if e.expires_at <= now]]

    def admit(self, namespace: str, key: str, handle: V, size: int, ttl_seconds: float) -> Admission[V]:
        """Store `handle` (a value of `size` bytes, at most the budget: check_fits) as the newest
        entry, replacing the key's old value and evicting the oldest entries until it fits."""
        dropped = self.sweep()
        if (namespace, key) in self._entries:
            dropped.append(self._pop((namespace, key)))
        evicted = 0
        while self._bytes + size > self.byte_budget:
            dropped.append(self._pop(next(iter(self._entries))))
            evicted += 1
        self._entries[(namespace, key)] = _Entry(handle, size, time.monotonic() + ttl_seconds)
        self._bytes += size
        self._evictions += evicted
        return Admission(dropped, evicted)

    def find(self, namespace: str, key: str) -> tuple[V, int] | None:
        """The handle and size of a live value; None when absent or expired."""
        entry = self._entries.get((namespace, key))
        if entry is None or entry.expires_at <= time.monotonic():
            return None
        return entry.handle, entry.size

    def forget(self, namespace: str, key: str, handle: V) -> bool:
        """Drop the key's entry if it still holds `handle` (its value was found lost)."""
        entry = self._entries.get((namespace, key))
        if entry is None or entry.handle != handle:
            return False
        self._pop((namespace, key))
        return True

    def remove(self, namespace: str, keys: list[str], prefix: str) -> list[V]:
        """Drop the given keys and, with a prefix, every key of the namespace starting with it."""
        doomed = {(namespace, key) for key in keys if (namespace, key) in self._entries}
        if prefix:
            doomed |= {k for k in self._entries if k[0] == namespace and k[1].startswith(prefix)}
        return [self._pop(entry_key) for entry_key in doomed]

    def drain(self) -> list[V]:
        """Drop everything (shutdown)."""
        return [self._pop(entry_key) for entry_key in list(self._entries)]

    def stats(self, backend: str) -> StoreStats:
        return StoreStats(backend, len(self._entries), self._bytes, self.byte_budget, self._evictions)
