"""Shared by the membership and prefill-fault tests: tiny-model worker and gateway processes,
address files, and what the gateway and the workers report."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from services.common.healthcheck import health_status
from services.common.pb import (common_pb2, decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc, prefill_pb2_grpc)
from services.stack import ServiceSpec, Stack, free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# Test gateways send every prompt to a prefill worker unless a test says otherwise: what a test of the
# handoff sends must take it, however many requests run at once (the default, adaptive, may not).
PINNED_PLACEMENT = ("--prefill-mode", "disaggregated")


def worker_spec(name: str, role: str, *extra: str) -> ServiceSpec:
    port = free_port()
    return ServiceSpec(name, role, port, ("--port", str(port), "--metrics-port", "0", "--model", "tiny",
                                          "--log-level", "DEBUG", *extra))


def gateway_spec(name: str, *args: str, metrics_port: int = 0) -> ServiceSpec:
    port = free_port()
    return ServiceSpec(name, "gateway", port, ("--port", str(port), "--metrics-port", str(metrics_port),
                                               "--http-port", "0", "--model", "tiny", "--log-level", "DEBUG",
                                               *PINNED_PLACEMENT, *args))


def write_addresses(path: Path, addresses: Sequence[str]) -> None:
    """Replace an address file atomically (as a ConfigMap update does)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text("# workers\n" + "".join(f"{address}\n" for address in addresses))
    os.replace(temporary, path)


def wait_serving(spec: ServiceSpec, process: subprocess.Popen[bytes], timeout: float = 120) -> float:
    """Block until the process reports SERVING; returns the time it did (time.monotonic)."""
    deadline = time.monotonic() + timeout
    while health_status(spec.address, timeout=0.5) != SERVING:
        assert process.poll() is None, f"{spec.name} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"{spec.name} not SERVING after {timeout}s"
        time.sleep(0.02)
    return time.monotonic()


def stop_gracefully(stack: Stack, name: str, timeout: float = 45) -> None:
    """SIGTERM; the process must drain and exit 0 within `timeout`."""
    process = stack.processes[name]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout) == 0, f"{name} exited with {process.returncode} after SIGTERM"


def start(stack: Stack, spec: ServiceSpec) -> subprocess.Popen[bytes]:
    if spec not in stack.specs:
        stack.specs.append(spec)
    return stack.start_one(spec)


async def gateway_stats(gateway: str) -> gateway_pb2.GatewayStats:
    async with grpc.aio.insecure_channel(gateway) as channel:
        return await gateway_pb2_grpc.GatewayServiceStub(channel).Stats(common_pb2.StatsRequest(), timeout=5)


async def states(gateway: str) -> dict[str, str]:
    """Each worker's state as the gateway reports it ('serving', 'backoff', ...)."""
    stats = await gateway_stats(gateway)
    return {w.address: gateway_pb2.WorkerState.Name(w.state).removeprefix("WORKER_STATE_").lower()
            for w in stats.workers}


async def wait_state(gateway: str, worker: str, state: str, timeout: float) -> float:
    """Seconds until the gateway reports `worker` in `state`; fails after `timeout`."""
    started = time.monotonic()
    while (await states(gateway)).get(worker) != state:
        assert time.monotonic() - started < timeout, (worker, state, await states(gateway))
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def requests_total(spec: ServiceSpec) -> int:
    """Requests a prefill or decode worker has received since it started."""
    stub_type = decode_pb2_grpc.DecodeServiceStub if spec.module == "decode" else prefill_pb2_grpc.PrefillServiceStub
    async with grpc.aio.insecure_channel(spec.address) as channel:
        return (await stub_type(channel).Stats(common_pb2.StatsRequest(), timeout=5)).requests_total
