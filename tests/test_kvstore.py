"""The kvstore backend contract, one suite run against every backend on real storage (memory, a
real Redis server, shared memory in /dev/shm): put, get, delete by key and prefix, namespaces, TTL,
byte budget, oldest-first eviction, overwrite, oversize refused, unavailable. Behind the shm
backend, /dev/shm holds exactly one segment per live value at the end of every test, none after
close. Then the same through the real gRPC service of each backend: a reader on the kvstore's host
reads an shm value from its segment, any other reader gets the bytes. Plus what is one backend's
own: Redis value splitting and its key index."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis

from services.bench.kvstore_get import measure, table
from services.common import shm
from services.common.channel_factory import ChannelFactory
from services.common.errors import (
    BackendUnavailable,
    InvalidRequest,
    KvCorrupted,
    UnknownRequest,
)
from services.common.kvstore_client import KvStoreClient
from services.common.pb import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from services.kvstore.backend import (
    BACKEND_NAMES,
    BackendSettings,
    KvBackend,
    make_backend,
)
from services.stack import ServiceSpec, Stack, free_port
from tests.conftest import start_healthy
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


@dataclass
class Kvstores:
    stack: Stack
    prefix: str  # of the shm kvstore's segments

    def __getitem__(self, name: str) -> str:
        return next(spec.address for spec in self.stack.specs if spec.name == name)


@pytest.fixture(scope="module")
def kvstores(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Kvstores]:
    """One kvstore process per backend (no model), by backend name."""
    prefix = f"kv-test-{uuid.uuid4().hex[:8]}"
    specs = []
    for name in BACKEND_NAMES:
        port = free_port()
        specs.append(ServiceSpec(name, "kvstore", port, (
            "--port", str(port), "--metrics-port", "0", "--backend", name, "--redis-url", redis_url,
            "--redis-key-prefix", prefix, "--shm-prefix", prefix)))
    log_dir = tmp_path_factory.mktemp("kvstores")
    stack = Stack(specs, log_dir=str(log_dir))
    start_healthy(stack, Path(log_dir))
    yield Kvstores(stack, prefix)
    stack.stop()
    assert shm.segments_of(prefix) == []  # the shm kvstore unlinked every segment at shutdown


@pytest.mark.parametrize("name", BACKEND_NAMES)
async def test_service_contract_and_read_paths(kvstores: Kvstores, name: str) -> None:
    namespace, value = f"api-test-{uuid.uuid4().hex[:6]}", os.urandom(200_000)
    local = kvstore_pb2.GetRequest(namespace=namespace, key="k/1", host_identity=shm.host_identity())
    async with grpc.aio.insecure_channel(kvstores[name]) as channel:
        stub = kvstore_pb2_grpc.KvStoreServiceStub(channel)
        await stub.Put(kvstore_pb2.PutRequest(namespace=namespace, key="k/1", value=value, ttl_seconds=30))
        for remote in ("", "another-host"):  # a reader that does not ask, or on another host: bytes
            reply = await stub.Get(kvstore_pb2.GetRequest(namespace=namespace, key="k/1", host_identity=remote))
            assert reply.value == value and not reply.HasField("shm")
        reply = await stub.Get(local)
        assert reply.HasField("shm") == (name == "shm")
        if name == "shm":
            assert reply.value == b"" and reply.shm.length == len(value)
            assert shm.read_segment(reply.shm.segment, reply.shm.length) == value
        for shared_memory_reads in (True, False):  # either way the client returns the bytes
            client = KvStoreClient(kvstores[name], namespace, 10.0, ChannelFactory(), shared_memory_reads)
            assert await client.get("k/1") == value
            await client.close()
        assert (await stub.Delete(kvstore_pb2.DeleteRequest(namespace=namespace, prefix="k/"))).deleted == 1
        for request in (local, kvstore_pb2.GetRequest(namespace=namespace, key="k/1")):
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.Get(request)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        for bad in (kvstore_pb2.PutRequest(namespace=namespace, key="", value=b"v"),
                    kvstore_pb2.PutRequest(namespace="", key="k", value=b"v"),
                    kvstore_pb2.PutRequest(namespace=namespace, key="has space", value=b"v")):
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await stub.Put(bad)
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stats = await stub.Stats(common_pb2.StatsRequest())
    assert stats.backend == name
    assert (stats.shm_gets_total > 0) == (name == "shm")


async def test_a_descriptor_read_after_the_value_went_is_not_found_never_other_bytes(kvstores: Kvstores) -> None:
    from services.common.kvstore_client import read_shared

    namespace = f"api-test-{uuid.uuid4().hex[:6]}"
    async with grpc.aio.insecure_channel(kvstores["shm"]) as channel:
        stub = kvstore_pb2_grpc.KvStoreServiceStub(channel)
        await stub.Put(kvstore_pb2.PutRequest(namespace=namespace, key="gone", value=b"g" * 1000))
        gone = (await stub.Get(kvstore_pb2.GetRequest(namespace=namespace, key="gone",
                                                      host_identity=shm.host_identity()))).shm
        assert await read_shared(gone, "gone") == b"g" * 1000
        await stub.Put(kvstore_pb2.PutRequest(namespace=namespace, key="gone", value=b"n" * 1000))  # replaced
        with pytest.raises(UnknownRequest):
            await read_shared(gone, "gone")
        now = (await stub.Get(kvstore_pb2.GetRequest(namespace=namespace, key="gone",
                                                     host_identity=shm.host_identity()))).shm
        assert now.segment != gone.segment and await read_shared(now, "gone") == b"n" * 1000
        for bad in (kvstore_pb2.ShmValue(segment=now.segment, length=999),  # not the segment's size
                    kvstore_pb2.ShmValue(segment="../../etc/passwd", length=10)):
            with pytest.raises(KvCorrupted):
                await read_shared(bad, "gone")
        await stub.Delete(kvstore_pb2.DeleteRequest(namespace=namespace, keys=["gone"]))
        with pytest.raises(UnknownRequest):
            await read_shared(now, "gone")


_WRITE_AND_WAIT = """
import sys, time
from services.bench.kvstore_get import measure, table
from services.common import shm
print(shm.write_segment(sys.argv[1], b"orphan"), flush=True)
time.sleep(60)
"""


def _segment_writer(prefix: str) -> tuple[subprocess.Popen[str], str]:
    """A process that wrote one segment of `prefix` and waits; and the segment's name."""
    writer = subprocess.Popen([sys.executable, "-c", _WRITE_AND_WAIT, prefix], stdout=subprocess.PIPE, text=True)
    return writer, writer.stdout.readline().strip() if writer.stdout else ""


async def test_shm_reaper_timer_unlinks_expired_values_and_segments_of_dead_kvstores() -> None:
    prefix = f"kv-test-{uuid.uuid4().hex[:8]}"
    dead, orphan = _segment_writer(prefix)
    store = make_backend("shm", BackendSettings(byte_budget=BUDGET, redis_url="", redis_key_prefix="",
                                                redis_part_bytes=1, shm_prefix=prefix, shm_reap_seconds=0.2))
    try:
        assert orphan in shm.segments_of(prefix)  # its creator still runs: not reaped at start
        await store.put("ns", "brief", b"b" * 10, 0.1)
        await store.put("ns", "kept", b"k" * 10, 60)
        dead.kill()
        dead.wait(timeout=30)
        await asyncio.sleep(0.8)  # no call meanwhile: the timer alone expires and reaps
        kept = await store.locate("ns", "kept")
        assert kept is not None and shm.segments_of(prefix) == [kept.segment]
    finally:
        dead.kill()
        await store.close()
    assert shm.segments_of(prefix) == []


async def test_get_benchmark_reports_each_read_path(kvstores: Kvstores) -> None:
    figures = await measure({"memory": kvstores["memory"], "shm": kvstores["shm"]}, 100_000, 3)
    assert [f.path for f in figures] == ["memory backend, gRPC bytes", "shm backend, gRPC bytes",
                                         "shm backend, descriptor"]
    assert all(f.median_ms > 0 and f.gb_per_s > 0 for f in figures)
    assert "descriptor" in table(figures, 100_000)


def test_kill_9_of_an_shm_kvstore_leaves_no_segment_after_its_restart(kvstores: Kvstores) -> None:
    """Last of the module: it kills and restarts the module's shm kvstore."""
    stack, prefix = kvstores.stack, kvstores.prefix
    with grpc.insecure_channel(kvstores["shm"]) as channel:
        stub = kvstore_pb2_grpc.KvStoreServiceStub(channel)
        for index in range(3):
            stub.Put(kvstore_pb2.PutRequest(namespace="n", key=f"k{index}", value=b"v" * 5000), timeout=10)
    left = shm.segments_of(prefix)
    assert len(left) == 3
    stack.processes["shm"].kill()  # SIGKILL: no shutdown, nothing unlinked
    stack.processes["shm"].wait(timeout=30)
    assert shm.segments_of(prefix) == left
    spec = next(spec for spec in stack.specs if spec.name == "shm")
    stack.start_one(spec)
    restarted = Stack([spec])
    restarted.processes = stack.processes
    restarted.wait_healthy(timeout=60)  # its reaper ran at start, before it served
    assert shm.segments_of(prefix) == []
    with grpc.insecure_channel(kvstores["shm"]) as channel, pytest.raises(grpc.RpcError) as missing:
        kvstore_pb2_grpc.KvStoreServiceStub(channel).Get(kvstore_pb2.GetRequest(namespace="n", key="k0"),
                                                         timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
