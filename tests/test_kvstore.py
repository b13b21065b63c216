"""The kvstore backend contract, one suite run against every backend on real storage (memory, a
real Redis server, shared memory in /dev/shm): put, get, delete by key and prefix, namespaces, TTL,
byte budget, oldest-first eviction, overwrite, oversize refused, unavailable. Behind the shm
backend, /dev/shm holds exactly one segment per live value at the end of every test, none after
close (the same through the gRPC service: tests/test_kvstore_service.py). Plus what is one
backend's own: Redis value splitting and its key index, an shm segment removed from outside."""

from __future__ import annotations

import asyncio
import resource
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import redis

from services.common import shm
from services.common.config import parse_settings
from services.common.errors import (
    BackendUnavailable,
    InvalidRequest,
    KvCorrupted,
    UnknownRequest,
)
from services.kvstore.backend import (
    BACKEND_NAMES,
    BackendSettings,
    KvBackend,
    make_backend,
)
from services.kvstore.settings import KvStoreSettings
from tests.redis_server import RedisServer

BUDGET = 1000


def _make(name: str, redis_url: str, prefix: str, budget: int = BUDGET) -> KvBackend:
    return make_backend(name, BackendSettings(byte_budget=budget, redis_url=redis_url, redis_key_prefix=prefix,
                                              redis_part_bytes=64, shm_prefix=prefix, shm_reap_seconds=60))


async def _close_and_check(name: str, store: KvBackend, prefix: str, redis_url: str) -> None:
    if name == "shm":  # one segment per live value, and none left once closed
        assert len(shm.segments_of(prefix)) == (await store.stats()).entries
    await store.close()
    if name == "shm":
        assert shm.segments_of(prefix) == []
    if name == "redis":
        client = redis.Redis.from_url(redis_url)
        leftovers = list(client.scan_iter(match=f"{prefix}:*"))
        if leftovers:
            client.delete(*leftovers)


@pytest.fixture(params=BACKEND_NAMES)
async def backend(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[KvBackend]:
    prefix = f"kv-test-{uuid.uuid4().hex[:8]}"
    store = _make(request.param, redis_url, prefix)
    yield store
    await _close_and_check(request.param, store, prefix, redis_url)


async def test_put_get_delete(backend: KvBackend) -> None:
    await backend.put("ns", "a", b"x" * 300, 60)
    await backend.put("ns", "empty", b"", 60)
    assert await backend.get("ns", "a") == b"x" * 300  # split into 5 parts on Redis
    assert await backend.get("ns", "empty") == b""
    assert await backend.delete("ns", ["a", "missing"], "") == 1
    with pytest.raises(UnknownRequest):
        await backend.get("ns", "a")
    assert await backend.delete("ns", ["empty"], "") == 1
    stats = await backend.stats()
    assert (stats.entries, stats.bytes_used) == (0, 0)


async def test_namespaces_are_separate(backend: KvBackend) -> None:
    await backend.put("model-a", "k", b"a", 60)
    await backend.put("model-b", "k", b"b", 60)
    assert await backend.get("model-a", "k") == b"a"
    assert await backend.get("model-b", "k") == b"b"
    with pytest.raises(UnknownRequest):
        await backend.get("model-c", "k")


async def test_ttl_expires_values_and_their_bytes(backend: KvBackend) -> None:
    await backend.put("ns", "short", b"s" * 100, 0.3)
    await backend.put("ns", "long", b"l" * 100, 60)
    await asyncio.sleep(0.5)
    with pytest.raises(UnknownRequest):
        await backend.get("ns", "short")
    assert await backend.get("ns", "long") == b"l" * 100
    stats = await backend.stats()
    assert (stats.entries, stats.bytes_used) == (1, 100)


async def test_budget_evicts_oldest_first(backend: KvBackend) -> None:
    for index in range(4):
        await backend.put("ns", f"k{index}", bytes([index]) * 300, 60)  # 1200 bytes > 1000 budget
    with pytest.raises(UnknownRequest):
        await backend.get("ns", "k0")
    assert [await backend.get("ns", f"k{i}") for i in (1, 2, 3)] == [bytes([i]) * 300 for i in (1, 2, 3)]
    assert await backend.put("ns", "new", b"n" * 200, 60) == 1  # k1 goes though just read: insertion order
    with pytest.raises(UnknownRequest):
        await backend.get("ns", "k1")
    stats = await backend.stats()
    assert (stats.entries, stats.bytes_used, stats.evictions_total) == (3, 800, 2)


async def test_overwrite_keeps_accounting_exact(backend: KvBackend) -> None:
    await backend.put("ns", "k", b"1" * 200, 60)
    await backend.put("ns", "k", b"2" * 100, 60)
    assert await backend.get("ns", "k") == b"2" * 100
    assert (await backend.stats()).bytes_used == 100


async def test_value_larger_than_budget_is_refused(backend: KvBackend) -> None:
    await backend.put("ns", "kept", b"k" * 10, 60)
    with pytest.raises(InvalidRequest):
        await backend.put("ns", "huge", b"h" * (BUDGET + 1), 60)
    assert await backend.get("ns", "kept") == b"k" * 10  # nothing evicted for a value that can never fit
    assert (await backend.stats()).entries == 1


async def test_delete_by_prefix(backend: KvBackend) -> None:
    for key in ("kv/r1/layout", "kv/r1/chunk/0", "kv/r10/layout", "kv/r2/layout"):
        await backend.put("ns", key, b"v", 60)
    await backend.put("other", "kv/r1/layout", b"o", 60)
    assert await backend.delete("ns", [], "kv/r1/") == 2
    assert await backend.get("ns", "kv/r10/layout") == b"v"
    assert await backend.get("other", "kv/r1/layout") == b"o"
    assert (await backend.stats()).entries == 3


@dataclass
class Outage:
    store: KvBackend
    cut: Callable[[], None]
    mend: Callable[[], None]


@contextmanager
def _refused_writes(max_file_bytes: int) -> Iterator[None]:
    """The kernel refuses this process's file writes past `max_file_bytes` (EFBIG), as a full
    /dev/shm refuses them (ENOSPC): both reach the backend as the same OSError."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a signal that kills
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.fixture(params=["redis", "shm"])
async def outage(request: pytest.FixtureRequest, private_redis: RedisServer) -> AsyncIterator[Outage]:
    """A backend and how to make its storage refuse service: Redis stopped; /dev/shm refusing writes."""
    prefix = f"kv-test-{uuid.uuid4().hex[:8]}"
    store = _make(request.param, private_redis.url, prefix)
    if request.param == "redis":
        yield Outage(store, private_redis.stop, private_redis.start)
    else:
        refused = _refused_writes(100)
        yield Outage(store, refused.__enter__, lambda: refused.__exit__(None, None, None))
    await _close_and_check(request.param, store, prefix, private_redis.url)


async def test_unavailable_storage_is_backend_unavailable_then_recovers(outage: Outage) -> None:
    store = outage.store
    await store.put("ns", "before", b"b" * 200, 60)
    outage.cut()
    try:
        with pytest.raises(BackendUnavailable):
            await store.put("ns", "during", b"d" * 200, 60)
    finally:
        outage.mend()
    with pytest.raises(UnknownRequest):
        await store.get("ns", "during")  # a refused put stores nothing, and leaves no segment
    await store.put("ns", "after", b"a" * 200, 60)
    assert await store.get("ns", "after") == b"a" * 200
    assert (await store.stats()).entries in (1, 2)  # Redis restarted empty; shm kept "before"


async def test_redis_down_fails_every_call_with_backend_unavailable(private_redis: RedisServer) -> None:
    store = _make("redis", private_redis.url, "p")
    private_redis.stop()
    try:
        for call in (store.get("ns", "k"), store.delete("ns", ["k"], ""), store.stats()):
            with pytest.raises(BackendUnavailable, match="redis"):
                await call
    finally:
        await store.close()


async def test_shm_value_whose_segment_was_removed_outside_is_data_loss() -> None:
    prefix = f"kv-test-{uuid.uuid4().hex[:8]}"
    store = _make("shm", "", prefix)
    try:
        await store.put("ns", "k", b"v" * 100, 60)
        location = await store.locate("ns", "k")
        assert location is not None and location.length == 100
        assert shm.read_segment(location.segment, 100) == b"v" * 100
        shm.unlink(location.segment)  # what `rm /dev/shm/...` or a stray reaper does
        with pytest.raises(KvCorrupted, match="removed or changed outside"):
            await store.get("ns", "k")
        with pytest.raises(UnknownRequest):  # the lost value is forgotten, its bytes with it
            await store.locate("ns", "k")
        assert (await store.stats()).bytes_used == 0
    finally:
        await store.close()


async def _written_or_gone(prefix: str, size: int, seconds: float = 30.0) -> None:
    """Wait until the one segment of `prefix` holds `size` bytes, or was there and is gone."""
    seen, deadline = False, time.monotonic() + seconds
    while time.monotonic() < deadline:
        names = shm.segments_of(prefix)
        try:
            if names and (shm.SHM_DIR / names[0]).stat().st_size == size:
                return
        except FileNotFoundError:
            pass
        if seen and not names:
            return
        seen = seen or bool(names)
        await asyncio.sleep(0.002)


async def test_shm_put_cancelled_while_writing_leaves_no_segment() -> None:
    prefix = f"kv-test-{uuid.uuid4().hex[:8]}"
    store = _make("shm", "", prefix, budget=50_000_000)
    try:
        put = asyncio.ensure_future(store.put("ns", "k", b"x" * 20_000_000, 60))
        await asyncio.sleep(0)  # the put has handed the write to a worker thread
        put.cancel()
        with pytest.raises(asyncio.CancelledError):
            await put
        await _written_or_gone(prefix, 20_000_000)  # the thread cannot be stopped: it writes on
        await asyncio.sleep(0.2)
        assert shm.segments_of(prefix) == []  # and the segment goes once written
        with pytest.raises(UnknownRequest):
            await store.get("ns", "k")
    finally:
        await store.close()


async def test_redis_prefix_delete_uses_the_key_index_not_a_keyspace_scan(private_redis) -> None:
    """Deleting a request's keys used to SCAN every key in Redis, on every request."""
    store = make_backend("redis", BackendSettings(byte_budget=10_000, redis_url=private_redis.url,
                                                  redis_key_prefix="p", redis_part_bytes=64,
                                                  shm_prefix="unused", shm_reap_seconds=60))
    try:
        for index in range(5):
            await store.put("ns", f"kv/req-a/t0/chunk/{index}", b"x" * 100, 60)
        await store.put("ns", "kv/req-ab/t0/layout", b"y", 60)  # shares the text prefix "kv/req-a"
        await store.put("other", "kv/req-a/t0/layout", b"z", 60)  # another namespace
        client = redis.Redis.from_url(private_redis.url)
        scans = client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)
        assert await store.delete("ns", [], "kv/req-a/") == 5
        assert client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0) == scans
        assert await store.get("ns", "kv/req-ab/t0/layout") == b"y"
        assert await store.get("other", "kv/req-a/t0/layout") == b"z"
        assert (await store.stats()).entries == 2
    finally:
        await store.close()


@pytest.mark.parametrize(("env", "phrase"), [({"KVSTORE_SHM_PREFIX": "Bad Prefix"}, "prefix"),
                                             ({"KVSTORE_SHM_PREFIX": "a.b"}, "prefix"),
                                             ({"KVSTORE_SHM_REAP_SECONDS": "0"}, "shm_reap_seconds")])
def test_bad_shm_settings_raise_value_error(env: dict[str, str], phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        parse_settings(KvStoreSettings, "kvstore", "", ["--backend", "shm"], env)
    settings = parse_settings(KvStoreSettings, "kvstore", "", ["--backend", "shm"], {})
    assert (settings.backend_settings().shm_prefix, settings.shm_reap_seconds) == ("disagg-kvstore", 30.0)
