"""The kvstore backend interface and its registry.

A backend stores values by (namespace, key) with a TTL and keeps its total size under a byte
budget by evicting the oldest entries first (memory and shm share that bookkeeping: ledger.py).
A backend whose values live in shared memory (shm) also tells where a value lies (`locate`), so
that a reader on the same host reads it from there instead of through gRPC. Backends raise the
domain errors of services.common.errors (UnknownRequest for a missing key, BackendUnavailable when
the store cannot be reached, InvalidRequest for a value that can never fit, KvCorrupted for a
value lost from shared memory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from services.common.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class StoreStats:
    backend: str
    entries: int
    bytes_used: int
    byte_budget: int
    evictions_total: int


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """What every backend needs; each backend takes the fields it uses."""

    byte_budget: int
    redis_url: str
    redis_key_prefix: str
    redis_part_bytes: int
    shm_prefix: str
    shm_reap_seconds: float


@dataclass(frozen=True, slots=True)
class ValueLocation:
    """Where a value lies in shared memory: a whole segment (services/common/shm.py) holding
    exactly `length` bytes, written once and never changed, unlinked when the value goes."""

    segment: str
    length: int


class KvBackend(Protocol):
    async def put(self, namespace: str, key: str, value: bytes, ttl_seconds: float) -> int:
        """Store a value; return how many entries were evicted to make room."""

    async def get(self, namespace: str, key: str) -> bytes: ...

    async def locate(self, namespace: str, key: str) -> ValueLocation | None:
        """Where a same-host reader finds the value. None from a backend that keeps no values in
        shared memory (read them with `get`); else UnknownRequest when the key is absent."""

    async def delete(self, namespace: str, keys: list[str], prefix: str) -> int: ...

    async def stats(self) -> StoreStats: ...

    async def close(self) -> None: ...


def check_fits(value: bytes, byte_budget: int) -> None:
    if len(value) > byte_budget:
        raise InvalidRequest(f"value of {len(value)} bytes is larger than the whole {byte_budget}-byte budget")


def make_backend(name: str, settings: BackendSettings) -> KvBackend:
    from services.kvstore.memory import MemoryBackend
    from services.kvstore.redis_backend import RedisBackend
    from services.kvstore.shm_backend import ShmBackend

    registry: dict[str, Callable[[BackendSettings], KvBackend]] = {
        "memory": lambda s: MemoryBackend(s.byte_budget),
        "redis": lambda s: RedisBackend(s.redis_url, s.redis_key_prefix, s.byte_budget, s.redis_part_bytes),
        "shm": lambda s: ShmBackend(s.byte_budget, s.shm_prefix, s.shm_reap_seconds),
    }
    if name not in registry:
        raise ValueError(f"unknown kvstore backend {name!r}; choose one of {sorted(registry)}")
    return registry[name](settings)


BACKEND_NAMES = ("memory", "redis", "shm")
