"""In-process kvstore backend: an insertion-ordered dict with lazy TTL expiry."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from services.common.errors import UnknownRequest
from services.kvstore.backend import StoreStats, check_fits


@dataclass(slots=True)
class _Entry:
    value: bytes
    expires_at: float


class MemoryBackend:
    def __init__(self, byte_budget: int) -> None:
        self._budget = byte_budget
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._bytes = 0
        self._evictions = 0

    def _remove(self, entry_key: tuple[str, str]) -> None:
        self._bytes -= len(self._entries.pop(entry_key).value)

    def _sweep(self) -> None:
        now = time.monotonic()
        for entry_key in [k for k, e in self._entries.items() if e.expires_at <= now]:
            self._remove(entry_key)

    async def put(self, namespace: str, key: str, value: bytes, ttl_seconds: float) -> int:
        check_fits(value, self._budget)
        self._sweep()
        if (namespace, key) in self._entries:
            self._remove((namespace, key))
        evicted = 0
        while self._bytes + len(value) > self._budget:
            self._remove(next(iter(self._entries)))
            evicted += 1
        self._entries[(namespace, key)] = _Entry(value, time.monotonic() + ttl_seconds)
        self._bytes += len(value)
        self._evictions += evicted
        return evicted

    async def get(self, namespace: str, key: str) -> bytes:
        entry = self._entries.get((namespace, key))
        if entry is None or entry.expires_at <= time.monotonic():
            raise UnknownRequest(f"key {key!r} not found in namespace {namespace!r}")
        return entry.value

    async def delete(self, namespace: str, keys: list[str], prefix: str) -> int:
        doomed = {(namespace, key) for key in keys if (namespace, key) in self._entries}
        if prefix:
            doomed |= {k for k in self._entries if k[0] == namespace and k[1].startswith(prefix)}
        for entry_key in doomed:
            self._remove(entry_key)
        return len(doomed)

    async def stats(self) -> StoreStats:
        self._sweep()
        return StoreStats("memory", len(self._entries), self._bytes, self._budget, self._evictions)

    async def close(self) -> None:
        self._entries.clear()
        self._bytes = 0
