"""gRPC server bootstrap shared by the four services.

Life of a server: start listening with health NOT_SERVING -> warm up (load the model) ->
SERVING -> SIGTERM/SIGINT sets the stop event -> health NOT_SERVING for every service
(`enter_graceful_shutdown`) -> `server.stop(grace)` lets in-flight calls finish -> exit.
Reflection is on, so `grpcurl` can list and call every service.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

# KV chunks are several MB; the default 4 MB receive limit is too small.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """Where and how one service listens."""

    name: str
    host: str
    port: int
    grace_seconds: float


def insecure_channel(address: str) -> grpc.aio.Channel:
    """A channel to another service of this system, with the shared message limits."""
    return grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def serve(spec: ServerSpec, register: Callable[[grpc.aio.Server], Sequence[str]],
                warmup: Callable[[], Awaitable[None]], stop: asyncio.Event | None = None) -> None:
    """Run a server until SIGTERM/SIGINT (or `stop` is set), then drain and stop it.

    `register` adds the servicers and returns their full service names; `warmup` runs after the
    port is open and before health turns SERVING.
    """
    stop = stop or asyncio.Event()
    _install_signal_handlers(stop)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    names = list(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    address = f"{spec.host}:{spec.port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    try:
        for name in ("", *names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("%s listening on %s, warming up", spec.name, address)
        warm = asyncio.ensure_future(warmup())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([warm, stopped], return_when=asyncio.FIRST_COMPLETED)
        if warm.done():
            warm.result()
            for name in ("", *names):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            log.info("%s serving on %s", spec.name, address)
            await stopped
        else:
            warm.cancel()
        log.info("%s draining (grace %.1fs)", spec.name, spec.grace_seconds)
        await health_servicer.enter_graceful_shutdown()
    finally:
        await server.stop(spec.grace_seconds)
        log.info("%s stopped", spec.name)
