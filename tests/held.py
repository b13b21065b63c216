"""What a stack still holds after its requests ended: requests and blocks on decode workers,
requests and KV on prefill workers, requests on gateways (and on the workers they route to), keys
in the kvstore. Shared by the fault-injection and the cluster tests."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from services.common.pb import common_pb2, decode_pb2_grpc, gateway_pb2_grpc, kvstore_pb2_grpc, prefill_pb2_grpc


class Addresses(Protocol):
    """A service's address by name (a RunningStack, a dict)."""

    def __getitem__(self, name: str) -> str: ...


@dataclass(frozen=True)
class Held:
    """What one service still holds: (requests, blocks or bytes or keys)."""

    service: str
    requests: int
    resources: int


@dataclass(frozen=True)
class Services:
    """The names (in a RunningStack's addresses) of the services to check, by role."""

    decodes: Sequence[str] = ("decode",)
    prefills: Sequence[str] = ("prefill",)
    gateways: Sequence[str] = ("gateway",)
    kvstores: Sequence[str] = ("kvstore",)


async def held(addresses: Addresses, services: Services) -> list[Held]:
    """Everything still held anywhere, as non-zero entries (`addresses[name]` is a service's)."""
    found: list[Held] = []
    for name in services.decodes:
        async with grpc.aio.insecure_channel(addresses[name]) as channel:
            stats = await decode_pb2_grpc.DecodeServiceStub(channel).Stats(common_pb2.StatsRequest(), timeout=10)
        found.append(Held(name, stats.active_requests, stats.blocks_used))
    for name in services.prefills:
        async with grpc.aio.insecure_channel(addresses[name]) as channel:
            prefill = await prefill_pb2_grpc.PrefillServiceStub(channel).Stats(common_pb2.StatsRequest(), timeout=10)
        found.append(Held(name, prefill.active_requests, prefill.kv_bytes_held))
    for name in services.gateways:
        async with grpc.aio.insecure_channel(addresses[name]) as channel:
            gateway = await gateway_pb2_grpc.GatewayServiceStub(channel).Stats(common_pb2.StatsRequest(), timeout=10)
        found.append(Held(name, gateway.active_requests, sum(w.active_requests for w in gateway.workers)))
    for name in services.kvstores:
        async with grpc.aio.insecure_channel(addresses[name]) as channel:
            store = await kvstore_pb2_grpc.KvStoreServiceStub(channel).Stats(common_pb2.StatsRequest(), timeout=10)
        found.append(Held(name, 0, store.entries))
    return [entry for entry in found if entry.requests or entry.resources]


async def assert_nothing_held(addresses: Addresses, services: Services,
                              seconds: float = 15.0) -> None:
    """Within `seconds` (cleanup after a cancel runs in the background), nothing is held anywhere."""
    remaining: list[Held] = []
    for _ in range(int(seconds / 0.2)):
        remaining = await held(addresses, services)
        if not remaining:
            return
        await asyncio.sleep(0.2)
    assert remaining == []


async def transferring_prefill(addresses: Addresses, prefills: Sequence[str], timeout: float = 60) -> str:
    """The prefill worker that has started sending a request's KV (it holds KV while it sends)."""
    for _ in range(int(timeout / 0.02)):
        for name in prefills:
            async with grpc.aio.insecure_channel(addresses[name]) as channel:
                stats = await prefill_pb2_grpc.PrefillServiceStub(channel).Stats(common_pb2.StatsRequest(), timeout=10)
            if stats.kv_bytes_held:
                return name
        await asyncio.sleep(0.02)
    raise TimeoutError("no prefill worker started a transfer")


async def decode_stats(address: str) -> object:
    """A decode worker's Stats."""
    async with grpc.aio.insecure_channel(address) as channel:
        return await decode_pb2_grpc.DecodeServiceStub(channel).Stats(common_pb2.StatsRequest(), timeout=10)


async def prefill_stats(address: str) -> object:
    """A prefill worker's Stats."""
    async with grpc.aio.insecure_channel(address) as channel:
        return await prefill_pb2_grpc.PrefillServiceStub(channel).Stats(common_pb2.StatsRequest(), timeout=10)


async def wait_decode_idle(address: str, seconds: float = 10.0) -> object:
    """A decode worker's Stats once it holds no request and no block (a request cancelled mid-step
    frees at step end), or the last Stats after `seconds`."""
    for _ in range(int(seconds / 0.1)):
        stats = await decode_stats(address)
        if (stats.active_requests, stats.blocks_used) == (0, 0):  # type: ignore[attr-defined]
            return stats
        await asyncio.sleep(0.1)
    return stats
