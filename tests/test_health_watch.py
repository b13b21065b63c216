"""The gateway's live membership against real gRPC health servers in this process (no model):
health watch, reported failures with backoff, address files swapped like a ConfigMap, readiness,
settings, and which prefill errors are the prefill's."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.channel_factory import ChannelFactory
from services.common.channels import ChannelPool
from services.common.errors import BackendUnavailable
from services.common.server import Readiness
from services.gateway.addresses import parse_address_lines
from services.gateway.membership import Membership
from services.gateway.prefill_route import is_prefill_fault
from services.gateway.routing import WorkerState
from services.gateway.settings import GatewaySettings
from services.stack import free_port

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
FAST = {"membership_refresh_seconds": 0.1, "health_timeout_seconds": 0.5, "health_retry_max_seconds": 0.3,
        "failure_backoff_seconds": 0.3, "failure_backoff_max_seconds": 0.6}


class HealthServer:
    """A gRPC server with only the health service, on a fixed port (so it can come back)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()

    async def start(self, status: int = SERVING) -> None:
        self._server = grpc.aio.server()
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self._server.add_insecure_port(self.address)
        await self._server.start()
        await self.health.set("", status)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None


async def _until(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until `condition` held; fails after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
async def servers() -> AsyncIterator[list[HealthServer]]:
    made = [HealthServer() for _ in range(3)]
    yield made
    for server in made:
        await server.stop()


async def _membership(**settings: object) -> tuple[Membership, Readiness, ChannelPool]:
    channels, readiness = ChannelPool(ChannelFactory()), Readiness()
    membership = Membership(GatewaySettings(model="tiny", **{**FAST, **settings}), channels, readiness)
    await membership.start()
    return membership, readiness, channels


async def _close(membership: Membership, channels: ChannelPool) -> None:
    await membership.close()
    await channels.close()


def _state(membership: Membership, address: str) -> WorkerState:
    return next(w.state for w in membership.decode.workers + membership.prefill.workers if w.address == address)


async def test_a_worker_follows_its_health_watch(servers: list[HealthServer]) -> None:
    worker = servers[0]
    await worker.start(NOT_SERVING)
    membership, readiness, channels = await _membership(decode_addresses=worker.address, prefill_mode="unified")
    try:
        await _until(lambda: _state(membership, worker.address) is WorkerState.NOT_SERVING, 2)
        with pytest.raises(BackendUnavailable, match=r"no decode worker is serving \(1 not_serving\)"):
            membership.decode.ranked()
        assert not readiness.ready
        await worker.health.set("", SERVING)
        assert await _until(lambda: membership.decode.serving, 2) < 0.5
        assert readiness.ready and membership.decode.ranked()[0].address == worker.address
        await worker.health.set("", NOT_SERVING)  # draining: no traffic at once
        assert await _until(lambda: not membership.decode.serving, 2) < 0.5
        assert not readiness.ready
        await worker.stop()
        await _until(lambda: _state(membership, worker.address) is WorkerState.UNREACHABLE, 3)
        await asyncio.sleep(1.5)  # down a while: the reconnect backoff has grown to its cap
        await worker.start(SERVING)
        assert await _until(lambda: membership.decode.serving, 5) < 2.0
    finally:
        await _close(membership, channels)


async def test_a_reported_failure_backs_off_until_a_health_check_passes(servers: list[HealthServer]) -> None:
    worker, other = servers[0], servers[1]
    await worker.start()
    await other.start()
    membership, readiness, channels = await _membership(decode_addresses=f"{worker.address},{other.address}",
                                                        prefill_mode="unified")
    try:
        await _until(lambda: len(membership.decode.ranked()) == 2 if membership.decode.serving else False, 2)
        await worker.health.set("", NOT_SERVING)
        membership.decode.report_failure(worker.address, "Generate UNAVAILABLE: test")
        failed = next(w for w in membership.decode.workers if w.address == worker.address)
        assert failed.state is WorkerState.BACKOFF and failed.last_failure == "Generate UNAVAILABLE: test"
        assert [w.address for w in membership.decode.ranked()] == [other.address]
        membership.decode.report_failure(worker.address, "again")  # the same incident: no longer backoff
        assert failed.failures == 1
        await _until(lambda: failed.failures >= 3, 3)  # health checks fail while it is not serving
        assert failed.state is WorkerState.BACKOFF
        await worker.health.set("", SERVING)
        assert await _until(lambda: failed.routable, 3) <= 0.6 + 0.5 + 0.2  # backoff cap + check + slack
        assert readiness.ready
    finally:
        await _close(membership, channels)


async def test_a_failed_worker_that_turns_serving_again_is_checked_at_once(servers: list[HealthServer]) -> None:
    worker = servers[0]
    await worker.start()
    membership, _, channels = await _membership(decode_addresses=worker.address, prefill_mode="unified",
                                                failure_backoff_seconds=0.2, failure_backoff_max_seconds=5)
    try:
        await _until(lambda: membership.decode.serving, 2)
        await worker.health.set("", NOT_SERVING)  # draining: a racing call was refused
        membership.decode.report_failure(worker.address, "admission UNAVAILABLE: draining")
        failed = membership.decode.workers[0]
        await _until(lambda: failed.failures >= 5, 5)  # the next check is 1.6-3.2 s away
        await worker.health.set("", SERVING)  # it restarted
        assert await _until(lambda: failed.routable, 3) < 1.0
    finally:
        await _close(membership, channels)


def _configmap_update(directory: Path, name: str, text: str) -> None:
    """Write `name` the way Kubernetes updates a mounted ConfigMap: a new timestamped folder, then
    the `..data` symlink swapped atomically; `name` itself is a symlink into `..data`."""
    stamp = directory / f"..{time.monotonic_ns()}"
    stamp.mkdir()
    (stamp / name).write_text(text)
    link = directory / "..data_tmp"
    link.symlink_to(stamp.name)
    os.replace(link, directory / "..data")
    if not (directory / name).is_symlink():
        (directory / name).symlink_to(f"..data/{name}")


async def test_address_files_are_followed_like_a_configmap(servers: list[HealthServer], tmp_path: Path) -> None:
    for server in servers:
        await server.start()
    first, second, third = (server.address for server in servers)
    _configmap_update(tmp_path, "decode", f"# decode workers\n{first}\n")
    membership, readiness, channels = await _membership(decode_addresses_file=str(tmp_path / "decode"),
                                                        prefill_addresses=third)
    try:
        await _until(lambda: readiness.ready, 2)
        assert [w.address for w in membership.decode.workers] == [first]
        _configmap_update(tmp_path, "decode", f"{first}\n{second}  # scaled up\n")
        await _until(lambda: len(membership.decode.ranked()) == 2 if membership.decode.serving else False, 2)
        _configmap_update(tmp_path, "decode", "not an address\n")  # a bad update keeps the last good list
        await asyncio.sleep(0.3)
        assert {w.address for w in membership.decode.workers} == {first, second}
        _configmap_update(tmp_path, "decode", f"{second}\n")
        await _until(lambda: [w.address for w in membership.decode.workers] == [second], 2)
        _configmap_update(tmp_path, "decode", "")  # scaled to zero: the gateway is not ready
        await _until(lambda: not readiness.ready, 2)
        with pytest.raises(BackendUnavailable, match="no decode worker is configured"):
            membership.decode.ranked()
    finally:
        await _close(membership, channels)


async def test_readiness_needs_a_serving_worker_of_each_role(servers: list[HealthServer]) -> None:
    prefill, decode = servers[0], servers[1]
    await decode.start()
    membership, readiness, channels = await _membership(prefill_addresses=prefill.address,
                                                        decode_addresses=decode.address)
    try:
        await _until(lambda: membership.decode.serving, 2)
        assert not readiness.ready  # no prefill worker yet
        await prefill.start()
        assert await _until(lambda: readiness.ready, 3) < 2.0
    finally:
        await _close(membership, channels)


def test_address_files_allow_comments_and_name_bad_lines() -> None:
    assert parse_address_lines("# workers\n10.0.0.1:50053\n\n decode-0.decode:50053 # pod 0\n[::1]:7\n", "f") == \
        ["10.0.0.1:50053", "decode-0.decode:50053", "[::1]:7"]
    with pytest.raises(ValueError, match="f line 2"):
        parse_address_lines("10.0.0.1:50053\n10.0.0.2\n", "f")


def test_address_settings_are_validated(tmp_path: Path) -> None:
    assert GatewaySettings().decode_addresses == "127.0.0.1:50053"  # neither list nor file: the default
    listed = tmp_path / "decode"
    listed.write_text("127.0.0.1:9\n")
    assert GatewaySettings(decode_addresses_file=str(listed)).decode_addresses == ""  # the file alone
    for bad, phrase in [({"decode_addresses_file": str(tmp_path / "missing")}, "decode_addresses_file"),
                        ({"prefill_addresses": "no-port"}, "prefill_addresses"),
                        ({"max_prefill_retries": -1}, "max_prefill_retries"),
                        ({"prefill_timeout_seconds": 0}, "prefill_timeout_seconds"),
                        ({"failure_backoff_seconds": 5, "failure_backoff_max_seconds": 1}, "failure_backoff_max")]:
        with pytest.raises(ValueError, match=phrase):
            GatewaySettings(**bad)


def _error(code: grpc.StatusCode, trailing: tuple[tuple[str, str], ...] = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), "details")


def test_which_prefill_errors_are_the_prefills() -> None:
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        assert is_prefill_fault(_error(code))
        assert not is_prefill_fault(_error(code, (("disagg-fault-role", "decode"),)))
        assert not is_prefill_fault(_error(code, (("disagg-fault-role", "kvstore"),)))
        assert is_prefill_fault(_error(code, (("disagg-fault-role", "prefill"),)))
    # INTERNAL is not retried: a prompt that breaks the model would break every worker in turn
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.INTERNAL):
        assert not is_prefill_fault(_error(code))
