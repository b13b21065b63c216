"""In-process kvstore backend: the values in this process's memory, kept by the shared Ledger
(insertion order, lazy TTL expiry, byte budget)."""

from __future__ import annotations

from services.common.errors import UnknownRequest
from services.kvstore.backend import StoreStats, ValueLocation, check_fits
from services.kvstore.ledger import Ledger


class MemoryBackend:
    def __init__(self, byte_budget: int) -> None:
        self._ledger: Ledger[bytes] = Ledger(byte_budget)

    async def put(self, namespace: str, key: str, value: bytes, ttl_seconds: float) -> int:
        check_fits(value, self._ledger.byte_budget)
        return self._ledger.admit(namespace, key, value, len(value), ttl_seconds).evicted

    async def get(self, namespace: str, key: str) -> bytes:
        found = self._ledger.find(namespace, key)
        if found is None:
            raise UnknownRequest(f"key {key!r} not found in namespace {namespace!r}")
        return found[0]

    async def locate(self, namespace: str, key: str) -> ValueLocation | None:
        return None  # values live in this process only

    async def delete(self, namespace: str, keys: list[str], prefix: str) -> int:
        return len(self._ledger.remove(namespace, keys, prefix))

    async def stats(self) -> StoreStats:
        self._ledger.sweep()
        return self._ledger.stats("memory")

    async def close(self) -> None:
        self._ledger.drain()
