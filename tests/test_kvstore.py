"""kvstore: put/get/delete, TTL, byte budget with oldest-first eviction, Redis value splitting and
namespacing; both backends against real storage (Redis server included)."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
import redis

from services.common.errors import InvalidRequest, UnknownRequest
from services.common.pb import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from services.kvstore.backend import BackendSettings, KvBackend, make_backend


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest, redis_url: str) -> KvBackend:
    prefix = f"disagg-test-{uuid.uuid4().hex[:8]}"
    store = make_backend(request.param, BackendSettings(byte_budget=1000, redis_url=redis_url,
                                                        redis_key_prefix=prefix, redis_part_bytes=64))
    yield store
    await store.close()
    if request.param == "redis":
        client = redis.Redis.from_url(redis_url)
        leftovers = list(client.scan_iter(match=f"{prefix}:*"))
        if leftovers:
            client.delete(*leftovers)


async def test_put_get_delete(backend: KvBackend) -> None:
    await backend.put("ns", "a", b"x" * 300, 60)
    assert await backend.get("ns", "a") == b"x" * 300  # split into 5 parts on Redis
    assert await backend.delete("ns", ["a", "missing"], "") == 1
    with pytest.raises(UnknownRequest):
        await backend.get("ns", "a")
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
    stats = await backend.stats()
    assert (stats.entries, stats.bytes_used, stats.evictions_total) == (3, 900, 1)


async def test_overwrite_keeps_accounting_exact(backend: KvBackend) -> None:
    await backend.put("ns", "k", b"1" * 200, 60)
    await backend.put("ns", "k", b"2" * 100, 60)
    assert await backend.get("ns", "k") == b"2" * 100
    assert (await backend.stats()).bytes_used == 100


async def test_value_larger_than_budget_is_refused(backend: KvBackend) -> None:
    with pytest.raises(InvalidRequest):
        await backend.put("ns", "huge", b"h" * 1001, 60)


async def test_delete_by_prefix(backend: KvBackend) -> None:
    for key in ("kv/r1/layout", "kv/r1/chunk/0", "kv/r10/layout", "kv/r2/layout"):
        await backend.put("ns", key, b"v", 60)
    assert await backend.delete("ns", [], "kv/r1/") == 2
    assert await backend.get("ns", "kv/r10/layout") == b"v"
    assert (await backend.stats()).entries == 2


@pytest.mark.parametrize("stack_name", ["memory_stack", "redis_stack"])
async def test_kvstore_service_api(request: pytest.FixtureRequest, stack_name: str) -> None:
    stack = request.getfixturevalue(stack_name)
    namespace = f"api-test-{uuid.uuid4().hex[:6]}"
    async with grpc.aio.insecure_channel(stack["kvstore"]) as channel:
        stub = kvstore_pb2_grpc.KvStoreServiceStub(channel)
        await stub.Put(kvstore_pb2.PutRequest(namespace=namespace, key="k/1", value=b"v" * 200_000, ttl_seconds=30))
        assert (await stub.Get(kvstore_pb2.GetRequest(namespace=namespace, key="k/1"))).value == b"v" * 200_000
        assert (await stub.Delete(kvstore_pb2.DeleteRequest(namespace=namespace, prefix="k/"))).deleted == 1
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Get(kvstore_pb2.GetRequest(namespace=namespace, key="k/1"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        for bad in (kvstore_pb2.PutRequest(namespace=namespace, key="", value=b"v"),
                    kvstore_pb2.PutRequest(namespace="", key="k", value=b"v"),
                    kvstore_pb2.PutRequest(namespace=namespace, key="has space", value=b"v")):
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await stub.Put(bad)
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stats = await stub.Stats(common_pb2.StatsRequest())
        assert stats.backend == stack_name.split("_")[0]


async def test_redis_prefix_delete_uses_the_key_index_not_a_keyspace_scan(private_redis) -> None:
    """Deleting a request's keys used to SCAN every key in Redis, on every request."""
    store = make_backend("redis", BackendSettings(byte_budget=10_000, redis_url=private_redis.url,
                                                  redis_key_prefix="p", redis_part_bytes=64))
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
