"""Redis kvstore backend, for workers on many hosts.

Layout under the key prefix P (keys are namespaced by model fingerprint N):
  P:N:n:KEY     number of parts of the value (values are split below Redis's size limits)
  P:N:v:KEY:I   part I of the value
  P:idx:order   sorted set of "N\\nKEY" by insertion sequence (oldest evicted first)
  P:idx:exp     sorted set of "N\\nKEY" by expiry time, to keep the byte count exact after TTLs
  P:idx:size    hash "N\\nKEY" -> value size;  P:idx:bytes, P:idx:seq, P:idx:evictions counters
  P:idx:keys:N  sorted set of every KEY of namespace N, all at score 0: a prefix delete is one
                ZRANGEBYLEX over it (a request's keys share a prefix), never a SCAN of the keyspace
Every value key also carries a Redis TTL, so nothing outlives its TTL even if this service dies.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.errors import BackendUnavailable, UnknownRequest
from services.kvstore.backend import StoreStats, ValueLocation, check_fits

T = TypeVar("T")


class RedisBackend:
    def __init__(self, url: str, key_prefix: str, byte_budget: int, part_bytes: int) -> None:
        self._url = url
        self._redis = aioredis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
        self._p = key_prefix
        self._budget = byte_budget
        self._part_bytes = part_bytes
        self._lock = asyncio.Lock()  # keeps the byte accounting exact under concurrent puts

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            return await operation()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BackendUnavailable(f"redis at {self._url} unavailable: {exc}") from exc

    def _count_key(self, namespace: str, key: str) -> str:
        return f"{self._p}:{namespace}:n:{key}"

    def _part_key(self, namespace: str, key: str, index: int) -> str:
        return f"{self._p}:{namespace}:v:{key}:{index}"

    def _names_key(self, namespace: str) -> str:
        return f"{self._p}:idx:keys:{namespace}"

    async def _remove(self, member: str) -> None:
        namespace, key = member.split("\n", 1)
        count = await self._redis.get(self._count_key(namespace, key))
        size = await self._redis.hget(f"{self._p}:idx:size", member)
        parts = int(count or 0)
        async with self._redis.pipeline(transaction=True) as pipe:
            keys = [self._count_key(namespace, key)] + [self._part_key(namespace, key, i) for i in range(parts)]
            pipe.delete(*keys)
            pipe.zrem(f"{self._p}:idx:order", member)
            pipe.zrem(self._names_key(namespace), key)
            pipe.zrem(f"{self._p}:idx:exp", member)
            pipe.hdel(f"{self._p}:idx:size", member)
            if size is not None:
                pipe.decrby(f"{self._p}:idx:bytes", int(size))
            await pipe.execute()

    async def _sweep(self) -> None:
        # members come back as bytes (no decode_responses), the same below
        expired = cast(list[bytes], await self._redis.zrangebyscore(f"{self._p}:idx:exp", "-inf", time.time() * 1000))
        for member in expired:
            await self._remove(member.decode())

    async def _bytes_used(self) -> int:
        return int(await self._redis.get(f"{self._p}:idx:bytes") or 0)

    async def put(self, namespace: str, key: str, value: bytes, ttl_seconds: float) -> int:
        check_fits(value, self._budget)
        return await self._call(lambda: self._put(namespace, key, value, ttl_seconds))

    async def _put(self, namespace: str, key: str, value: bytes, ttl_seconds: float) -> int:
        member = f"{namespace}\n{key}"
        async with self._lock:
            await self._sweep()
            if await self._redis.hexists(f"{self._p}:idx:size", member):
                await self._remove(member)
            evicted = 0
            while await self._bytes_used() + len(value) > self._budget:
                oldest = cast(list[bytes], await self._redis.zrange(f"{self._p}:idx:order", 0, 0))
                if not oldest:
                    break
                await self._remove(oldest[0].decode())
                evicted += 1
            await self._write(namespace, key, member, value, ttl_seconds, evicted)
        return evicted

    async def _write(self, namespace: str, key: str, member: str, value: bytes, ttl: float, evicted: int) -> None:
        ttl_ms = max(1, int(ttl * 1000))
        parts = max(1, math.ceil(len(value) / self._part_bytes))
        sequence = await self._redis.incr(f"{self._p}:idx:seq")
        async with self._redis.pipeline(transaction=True) as pipe:
            for index in range(parts):
                part = value[index * self._part_bytes : (index + 1) * self._part_bytes]
                pipe.set(self._part_key(namespace, key, index), part, px=ttl_ms)
            pipe.set(self._count_key(namespace, key), parts, px=ttl_ms)  # written last: marks the value complete
            pipe.zadd(f"{self._p}:idx:order", {member: sequence})
            pipe.zadd(self._names_key(namespace), {key: 0})
            pipe.zadd(f"{self._p}:idx:exp", {member: time.time() * 1000 + ttl_ms})
            pipe.hset(f"{self._p}:idx:size", member, len(value))
            pipe.incrby(f"{self._p}:idx:bytes", len(value))
            pipe.incrby(f"{self._p}:idx:evictions", evicted)
            await pipe.execute()

    async def get(self, namespace: str, key: str) -> bytes:
        return await self._call(lambda: self._get(namespace, key))

    async def _get(self, namespace: str, key: str) -> bytes:
        count = await self._redis.get(self._count_key(namespace, key))
        parts: list[Any] = []
        if count is not None:
            parts = await self._redis.mget([self._part_key(namespace, key, i) for i in range(int(count))])
        if count is None or any(part is None for part in parts):
            raise UnknownRequest(f"key {key!r} not found in namespace {namespace!r}")
        return b"".join(parts)

    async def locate(self, namespace: str, key: str) -> ValueLocation | None:
        return None  # values live in Redis: readers get bytes

    async def delete(self, namespace: str, keys: list[str], prefix: str) -> int:
        return await self._call(lambda: self._delete(namespace, keys, prefix))

    async def _delete(self, namespace: str, keys: list[str], prefix: str) -> int:
        deleted = 0
        async with self._lock:  # after any put in progress, so a key it is writing goes too
            names = set(keys)
            if prefix:
                found = cast(list[bytes], await self._redis.zrangebylex(self._names_key(namespace),
                                                                        b"[" + prefix.encode(),
                                                                        b"[" + prefix.encode() + b"\xff"))
                names |= {name.decode() for name in found}
            for member in (f"{namespace}\n{name}" for name in names):
                if await self._redis.hexists(f"{self._p}:idx:size", member):
                    await self._remove(member)
                    deleted += 1
        return deleted

    async def stats(self) -> StoreStats:
        return await self._call(self._stats)

    async def _stats(self) -> StoreStats:
        async with self._lock:
            await self._sweep()
        entries = await self._redis.zcard(f"{self._p}:idx:order")
        evictions = int(await self._redis.get(f"{self._p}:idx:evictions") or 0)
        return StoreStats("redis", entries, await self._bytes_used(), self._budget, evictions)

    async def close(self) -> None:
        await self._redis.aclose()
