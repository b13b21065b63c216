"""Health and shutdown: NOT_SERVING until the model is loaded and while draining; SIGTERM lets
in-flight generations finish, refuses new work, and the process exits 0; `make up`'s launcher
stops all four services cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.client import GatewayClient, GatewayError
from services.common.healthcheck import health_status
from services.stack import ServiceSpec, Stack, free_port
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


def test_launcher_stops_all_four_cleanly(tmp_path: Path) -> None:
    base, metrics = free_port(), free_port()
    while any(p in range(base, base + 4) for p in range(metrics, metrics + 4)):
        metrics = free_port()
    launcher = subprocess.Popen([sys.executable, "-m", "services.stack", "--model", "tiny", "--base-port", str(base),
                                 "--metrics-base-port", str(metrics), "--http-port", str(free_port())], cwd=ROOT, stdout=subprocess.PIPE,
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
