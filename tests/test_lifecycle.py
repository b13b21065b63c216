"""Health and shutdown: NOT_SERVING until the model is loaded and while draining; SIGTERM lets
in-flight generations finish, refuses new work, and the process exits 0; `make up`'s launcher
stops all four services cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.client import GatewayClient, GatewayError
from services.common.healthcheck import health_status
from services.stack import PortAllocator, ServiceSpec, Stack, free_port, free_port_run
from tests.conftest import RunningStack, start_stack

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
ROOT = Path(__file__).resolve().parent.parent


def test_not_serving_until_the_model_is_loaded(tmp_path: Path) -> None:
    port = free_port()
    stack = Stack([ServiceSpec("decode", "decode", port, ("--port", str(port), "--metrics-port", "0"))],
                  log_dir=str(tmp_path))
    stack.start()
    seen: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while (status := health_status(f"127.0.0.1:{port}", timeout=0.5)) != SERVING:
            seen.append(status)
            assert time.monotonic() < deadline, seen[-5:]
            time.sleep(0.02)
    finally:
        stack.stop()
    assert NOT_SERVING in seen
    assert stack.processes["decode"].returncode == 0


@pytest.fixture
def tiny_stack(tmp_path: Path) -> RunningStack:
    running = start_stack(tmp_path, "tiny")
    yield running
    running.stack.stop()


async def _drain_during_generation(stack: RunningStack, victim: str) -> None:
    async with GatewayClient(stack["gateway"]) as client:
        stream = client.generate("Once upon a time", max_tokens=600, temperature=0, ignore_eos=True)
        tokens = 0
        async for chunk in stream:
            tokens += len(chunk.token_ids)
            if tokens == 3:
                stack.stack.processes[victim].send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                assert await asyncio.to_thread(health_status, stack[victim]) == NOT_SERVING
                with pytest.raises(GatewayError) as refused:
                    await client.complete("Another request", max_tokens=2)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            last = chunk
    assert tokens == 600 and last.finish_reason == "length"
    assert await asyncio.to_thread(stack.stack.processes[victim].wait, 30) == 0


async def test_sigterm_on_decode_lets_the_generation_finish(tiny_stack: RunningStack) -> None:
    await _drain_during_generation(tiny_stack, "decode")


async def test_sigterm_on_gateway_lets_the_generation_finish(tiny_stack: RunningStack) -> None:
    await _drain_during_generation(tiny_stack, "gateway")


def test_a_run_of_ports_is_free_and_never_handed_out_again() -> None:
    """A stack's base port: its services take base + 0..3, so all four must be free, and no later
    free_port may give one of them to another server (it would answer on the stack's port after
    the stack stopped)."""
    allocator = PortAllocator()
    base = allocator.take_run(4)
    listeners = []
    try:
        for port in range(base, base + 4):
            listener = socket.create_server(("127.0.0.1", port))  # each one free
            listeners.append(listener)
        assert all(allocator.take() not in range(base, base + 4) for _ in range(200))
        assert allocator.take_run(4) not in range(base - 3, base + 4)  # runs never overlap
    finally:
        for listener in listeners:
            listener.close()


def test_launcher_stops_all_four_cleanly(tmp_path: Path) -> None:
    base, metrics = free_port_run(4), free_port_run(4)  # each service's port and metrics port: base + 0..3
    launcher = subprocess.Popen([sys.executable, "-m", "services.stack", "--model", "tiny", "--base-port", str(base),
                                 "--metrics-base-port", str(metrics), "--http-port", str(free_port())], cwd=ROOT,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 180
        for line in launcher.stdout:
            if "All four services are healthy" in line or time.monotonic() > deadline:
                break
        assert health_status(f"127.0.0.1:{base}") == SERVING
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    for port in range(base, base + 4):
        assert health_status(f"127.0.0.1:{port}", timeout=0.3) == -1


def test_kvstore_drain_waits_for_calls_in_flight(tmp_path: Path, private_redis) -> None:
    """SIGTERM to the kvstore while a Get waits on Redis: the call finishes within --grace-seconds
    (the drain used to see nothing in flight and cut it off), then the process exits 0."""
    import redis as redis_client

    from services.common.pb import kvstore_pb2, kvstore_pb2_grpc

    port = free_port()
    stack = Stack([ServiceSpec("kvstore", "kvstore", port, (
        "--port", str(port), "--metrics-port", "0", "--backend", "redis", "--redis-url", private_redis.url,
        "--grace-seconds", "20"))], log_dir=str(tmp_path))
    stack.start()
    try:
        stack.wait_healthy(timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kvstore_pb2_grpc.KvStoreServiceStub(channel)
            stub.Put(kvstore_pb2.PutRequest(namespace="n", key="k", value=b"value"), timeout=10)
            redis_pid = redis_client.Redis.from_url(private_redis.url).info("server")["process_id"]
            os.kill(redis_pid, signal.SIGSTOP)
            try:
                pending = stub.Get.future(kvstore_pb2.GetRequest(namespace="n", key="k"), timeout=30)
                time.sleep(0.5)
                stack.processes["kvstore"].send_signal(signal.SIGTERM)
                time.sleep(2.5)  # longer than the final stop allows a call the drain does not know of
            finally:
                os.kill(redis_pid, signal.SIGCONT)
            assert pending.result().value == b"value"
        assert stack.processes["kvstore"].wait(30) == 0
    finally:
        stack.stop()


def test_sigterm_again_while_a_service_stops_still_lets_it_exit_zero(tmp_path: Path) -> None:
    """Kubernetes, a supervisor or an impatient user may send SIGTERM again while a service is on
    its way out. The stop used to give the signals back to their default action before the process
    had exited, so a second SIGTERM in that window killed it (exit -15, seen in the rolling-restart
    test on a slow machine) instead of letting it finish its clean stop."""
    port = free_port()
    stack = Stack([ServiceSpec("kvstore", "kvstore", port, ("--port", str(port), "--metrics-port", "0",
                                                            "--backend", "memory"))], log_dir=str(tmp_path))
    stack.start()
    try:
        stack.wait_healthy(timeout=60)
        process = stack.processes["kvstore"]
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:  # SIGTERM every 10 ms until it exits
            process.send_signal(signal.SIGTERM)
            time.sleep(0.01)
        assert process.wait(5) == 0
    finally:
        stack.stop()


async def test_a_worker_that_can_no_longer_serve_says_not_serving_and_stops(tmp_path: Path) -> None:
    """`Lifecycle.fail` (the decode loop died, a step hung): health turns NOT_SERVING at once, the
    server stops without draining, and serve() raises FatalStop (the process exits non-zero)."""
    from grpc_health.v1 import health_pb2_grpc

    from services.common.server import FatalStop, Lifecycle, ServerSpec, serve
    from services.common.telemetry import service_telemetry

    port, lifecycle, statuses = free_port(), Lifecycle(), []

    async def watch_then_fail() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            async for reply in stream:
                statuses.append(reply.status)
                if reply.status == SERVING:
                    lifecycle.fail("the decode loop ended")
                elif statuses[-2:] == [SERVING, NOT_SERVING]:
                    return

    async def warmup() -> None:
        watcher.append(asyncio.ensure_future(watch_then_fail()))

    watcher: list[asyncio.Future[None]] = []
    with pytest.raises(FatalStop, match="decode loop ended"):
        await serve(ServerSpec("test", "127.0.0.1", port, 30.0, 0), service_telemetry("test"), lifecycle,
                    lambda server: [], warmup)
    await asyncio.wait_for(watcher[0], 10)
    assert statuses[-2:] == [SERVING, NOT_SERVING]
