"""Several addresses behind one channel (services/common/targets.py), and workers on a pool of
kvstores: calls go to the kvstores whose health is SERVING, and a call made while none is (one
drains, the other has not come back yet) waits for one instead of failing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.channel_factory import ChannelFactory
from services.common.errors import BackendUnavailable
from services.common.healthcheck import health_status
from services.common.kvstore_client import RETRY_WINDOW_SECONDS, KvStoreClient
from services.common.targets import SERVICE_CONFIG, channel_target, check_address_list
from services.stack import ServiceSpec, Stack, free_port
from tests.membership_helpers import NOT_SERVING, stop_gracefully
from tests.redis_server import RedisServer


def test_one_address_is_dialled_as_it_is() -> None:
    assert channel_target("127.0.0.1:50051") == channel_target(["127.0.0.1:50051"])
    assert channel_target("dns:///gateway:50051").target == "dns:///gateway:50051"
    assert channel_target(" 10.0.0.1:1 ,").options == ()


def test_several_addresses_make_one_round_robin_target_over_serving_servers() -> None:
    target = channel_target("10.0.0.1:1, 10.0.0.2:2,10.0.0.1:1")
    assert target.target == "ipv4:10.0.0.1:1,10.0.0.2:2" and target.addresses == 2
    options = dict(target.options)
    assert json.loads(options["grpc.service_config"]) == json.loads(SERVICE_CONFIG)
    assert json.loads(SERVICE_CONFIG)["healthCheckConfig"] == {"serviceName": ""}
    assert options["grpc.default_authority"] == "10.0.0.1:1"  # what TLS verifies without a server name
    assert channel_target(["[::1]:1", "[::1]:2"]).target == "ipv6:[::1]:1,[::1]:2"
    assert channel_target("localhost:7,127.0.0.1:8").target == "ipv4:127.0.0.1:7,127.0.0.1:8"  # names resolved


@pytest.mark.parametrize(("address", "phrase"), [("10.0.0.1:1,[::1]:2", "mix IPv4 and IPv6"),
                                                 ("10.0.0.1:1,nowhere", "not host:port"), ("", "no address")])
def test_bad_address_lists_are_refused(address: str, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        channel_target(address)


def test_worker_settings_check_every_kvstore_address() -> None:
    check_address_list("kvstore_address", "")
    check_address_list("kvstore_address", "kvstore:50054,10.0.0.2:50054")
    with pytest.raises(ValueError, match="kvstore_address: address 'kvstore' is not host:port"):
        check_address_list("kvstore_address", "10.0.0.1:1,kvstore")


def _kvstore(name: str, *backend: str) -> ServiceSpec:
    port = free_port()
    return ServiceSpec(name, "kvstore", port, ("--port", str(port), "--metrics-port", "0", *backend))


@pytest.fixture
def late_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis that is not running yet (its port is chosen)."""
    server = RedisServer(tmp_path)
    yield server
    server.stop()


async def test_a_call_waits_out_a_moment_with_no_serving_kvstore(tmp_path: Path, late_redis: RedisServer) -> None:
    """kvstore `first` serves; `second` waits for its Redis (NOT_SERVING). `first` drains and
    stops; a put made then succeeds once `second` serves, within the client's retry window."""
    first = _kvstore("first", "--backend", "memory")
    second = _kvstore("second", "--backend", "redis", "--redis-url", late_redis.url)
    stack = Stack([first, second], log_dir=str(tmp_path))
    stack.start()
    client = KvStoreClient(f"{first.address},{second.address}", "pool-test", 10.0, ChannelFactory())
    try:
        waiting = Stack([first])
        waiting.processes = stack.processes
        await asyncio.to_thread(waiting.wait_healthy, 60)
        deadline = time.monotonic() + 60
        while await asyncio.to_thread(health_status, second.address) != NOT_SERVING:
            assert time.monotonic() < deadline, "second kvstore not listening"
            await asyncio.sleep(0.1)
        await client.put("before", b"1")  # only `first` serves
        await asyncio.to_thread(stop_gracefully, stack, "first")
        began = time.monotonic()
        put = asyncio.ensure_future(client.put("during", b"2"))
        await asyncio.sleep(0.3)
        assert not put.done(), "the put gave up while no kvstore was serving"
        late_redis.start()  # `second` turns SERVING within its 1 s backend poll
        await put
        assert time.monotonic() - began < RETRY_WINDOW_SECONDS
        assert await client.get("during") == b"2"
        stop_gracefully(stack, "second")
        with pytest.raises(BackendUnavailable):  # none at all: given up after the window
            await client.get("during")
        assert time.monotonic() - began < 2 * RETRY_WINDOW_SECONDS + 5
    finally:
        await client.close()
        stack.stop()
