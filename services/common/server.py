"""gRPC server bootstrap shared by the four services.

Life of a server: listen with health NOT_SERVING -> warm up (load and warm the model) -> SERVING
(a server given a `Readiness` is SERVING only while it says ready: the gateway while it has
workers) -> SIGTERM/SIGINT sets the stop event -> health NOT_SERVING for every service
(`enter_graceful_shutdown`) and new work is refused with UNAVAILABLE (draining) -> in-flight work
finishes, up to the grace period -> `server.stop` -> exit 0. Reflection is on, so `grpcurl` can
list and call every service. Prometheus metrics are served on their own HTTP port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.allocator import tune_allocator
from services.common.config import parse_settings
from services.common.errors import BackendUnavailable
from services.common.logs import setup_logging
from services.common.targets import RECONNECT_OPTIONS
from services.common.telemetry import ServiceTelemetry, serve_metrics, setup_tracing
from services.common.tls import ServerTls, add_port

log = logging.getLogger(__name__)

# KV chunks are several MB; the default 4 MB receive limit is too small.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# HTTP/2 for multi-MB KV messages: the largest frames (16 MiB - 1, not 16 KiB: fewer frames per chunk)
# and a 16 MiB per-stream flow-control window target (a chunk in flight is not held up by window
# updates). In a loopback test of 32 x 3 MiB messages they moved ~25% faster on average than with
# grpc's defaults (measured on a busy 2-core machine: noisy). Both sides advertise them.
HTTP2_BULK_OPTIONS: list[tuple[str, int]] = [
    ("grpc.http2.max_frame_size", 16 * 1024 * 1024 - 1),
    ("grpc.http2.lookahead_bytes", 16 * 1024 * 1024),
]
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    *HTTP2_BULK_OPTIONS,
    *RECONNECT_OPTIONS,
]
S = TypeVar("S", bound="DataclassInstance")
FINAL_STOP_SECONDS = 1.0  # after in-flight work drained, what server.stop still allows
LIVENESS_SERVICE = "liveness"  # health service name that says only "this process works"


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """Where and how one service listens."""

    name: str
    host: str
    port: int
    grace_seconds: float
    metrics_port: int
    tls: ServerTls | None = None  # None: plaintext


class Lifecycle:
    """Whether the server takes new work, how much work is in flight, and whether it must stop: on
    a signal, or because a part it cannot serve without died (`fail`: the process then exits
    non-zero so its supervisor restarts it)."""

    def __init__(self) -> None:
        self.draining = False
        self.fatal: str | None = None
        self.stop = asyncio.Event()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def fail(self, reason: str) -> None:
        """This worker can no longer serve: stop (health NOT_SERVING at once) and exit non-zero."""
        if self.fatal is None:
            self.fatal = reason
            log.error("cannot serve any more: %s", reason)
        self.stop.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def begin(self, new: bool = True) -> Callable[[], None]:
        """Count one piece of work in flight; returns the function that ends it (idempotent). New
        work is refused with UNAVAILABLE once draining; work that belongs to already admitted work
        (new=False) is not."""
        if new and self.draining:
            raise BackendUnavailable("server is shutting down; retry on another worker")
        self._in_flight += 1
        self._idle.clear()
        ended = False

        def end() -> None:
            nonlocal ended
            if not ended:
                ended = True
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()
        return end

    @contextmanager
    def work(self, new: bool = True) -> Iterator[None]:
        """`begin` for the life of a `with` block."""
        end = self.begin(new)
        try:
            yield
        finally:
            end()

    async def drain(self, timeout: float) -> bool:
        """Refuse new work and wait for in-flight work; False if the timeout came first."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SignalHandler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None  # signal.getsignal's


class Readiness:
    """Whether a warmed-up server may report SERVING, for a server whose readiness depends on
    others (the gateway on its workers); its health follows every change."""

    def __init__(self, ready: bool = False) -> None:
        self._ready = ready
        self._changed = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._ready

    def set(self, ready: bool) -> None:
        if ready != self._ready:
            self._ready = ready
            self._changed.set()

    async def changed(self) -> None:
        await self._changed.wait()
        self._changed.clear()


def _install_signal_handlers(stop: asyncio.Event) -> dict[int, SignalHandler]:
    """The loop sets `stop` on a stop signal; returns the handlers it replaced."""
    loop = asyncio.get_running_loop()
    previous: dict[int, SignalHandler] = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    return previous


def _restore_signal_handlers(previous: dict[int, SignalHandler]) -> None:
    """Hand the stop signals back from the loop to the handlers they had before (a service's
    process ignores them by then: run_service). The loop's removal alone would restore their
    default action, and a second SIGTERM from a supervisor would kill the service mid-exit."""
    loop = asyncio.get_running_loop()
    for sig, handler in previous.items():
        loop.remove_signal_handler(sig)
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # None: not set from Python


def _ignore_stop_signals() -> None:
    """For a service's process from its asyncio run on: `serve` handles the stop signals while
    it serves; before and after, the process is starting its loop or already stopping."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


async def serve(spec: ServerSpec, telemetry: ServiceTelemetry, lifecycle: Lifecycle,
                register: Callable[[grpc.aio.Server], Sequence[str]], warmup: Callable[[], Awaitable[None]],
                interceptors: Sequence[grpc.aio.ServerInterceptor] = (), readiness: Readiness | None = None) -> None:
    """Run a server until SIGTERM/SIGINT (or `lifecycle.stop` is set), then drain and stop it.

    `register` adds the servicers and returns their full service names; `warmup` runs after the
    port is open and before health turns SERVING (and with `readiness`, only while it is ready).
    After a `lifecycle.fail` the drain is skipped (the worker cannot finish its work) and FatalStop
    is raised.
    """
    stop = lifecycle.stop
    previous_handlers = _install_signal_handlers(stop)
    # No SO_REUSEPORT: a second server on a taken port fails at start instead of silently sharing it.
    server = grpc.aio.server(options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)], interceptors=list(interceptors))
    names = list(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    address = f"{spec.host}:{spec.port}"
    if add_port(server, address, spec.tls) == 0:
        raise OSError(f"cannot listen on {address}")
    stop_metrics = serve_metrics(telemetry.registry, spec.host, spec.metrics_port)
    await server.start()
    try:
        for name in ("", *names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("%s listening on %s (%s; metrics on port %s), warming up", spec.name, address,
                 spec.tls.describe() if spec.tls else "plaintext", spec.metrics_port or "-")
        if await _warm_up(warmup, stop):
            # Alive once warmed up, whatever the readiness: a gateway without workers is not ready
            # but must not be restarted for it (Kubernetes liveness asks this name).
            await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
            await _serve_until_stopped(spec, health_servicer, ["", *names], stop, readiness or Readiness(True))
        await health_servicer.enter_graceful_shutdown()
        if lifecycle.fatal is None:
            await _drain(spec, lifecycle)
    finally:
        await server.stop(FINAL_STOP_SECONDS)
        stop_metrics()
        _restore_signal_handlers(previous_handlers)
        log.info("%s stopped", spec.name)
    if lifecycle.fatal is not None:
        raise FatalStop(lifecycle.fatal)


class FatalStop(Exception):
    """The server stopped because it could no longer serve (the process exits non-zero)."""


async def _drain(spec: ServerSpec, lifecycle: Lifecycle) -> None:
    started = time.monotonic()
    log.info("%s draining: %d in flight, grace %.1fs", spec.name, lifecycle.in_flight, spec.grace_seconds)
    if not await lifecycle.drain(spec.grace_seconds):
        log.warning("%s: grace period over with %d still in flight", spec.name, lifecycle.in_flight)
    log.info("%s drained in %.2fs", spec.name, time.monotonic() - started)


async def _serve_until_stopped(spec: ServerSpec, health_servicer: health.aio.HealthServicer, names: list[str],
                               stop: asyncio.Event, readiness: Readiness) -> None:
    """Health SERVING while `readiness` says ready, NOT_SERVING otherwise, until `stop`."""
    serving = None
    while not stop.is_set():
        if readiness.ready != serving:
            serving = readiness.ready
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in names:
                await health_servicer.set(name, status)
            log.info("%s %s on %s:%d", spec.name, "serving" if serving else "not serving (not ready)", spec.host,
                     spec.port)
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(readiness.changed())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()


async def _warm_up(warmup: Callable[[], Awaitable[None]], stop: asyncio.Event) -> bool:
    """Run warmup unless a stop comes first; True if it completed."""
    warm = asyncio.ensure_future(warmup())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([warm, stopped], return_when=asyncio.FIRST_COMPLETED)
    if warm.done():
        stopped.cancel()
        warm.result()
        return True
    warm.cancel()
    await asyncio.gather(warm, return_exceptions=True)
    return False


def run_service(name: str, settings_type: type[S], description: str,
                run: Callable[[S], Coroutine[Any, Any, None]]) -> None:
    """The `main()` of a service: settings (exit with a message when invalid), logging, tracing,
    the asyncio run, and a final flush of buffered spans."""
    try:
        settings = parse_settings(settings_type, f"python -m services.{name}", description)
        setup_logging(name, settings.log_level)  # type: ignore[attr-defined]
        tracing = setup_tracing(name)
    except ValueError as exc:
        sys.exit(f"{name}: {exc}")
    tune_allocator()
    _ignore_stop_signals()
    try:
        asyncio.run(run(settings))
    except FatalStop as stopped:
        tracing.shutdown()
        log.critical("%s stopped, cannot serve: %s", name, stopped)
        logging.shutdown()  # flushes the handlers
        # Not sys.exit: interpreter exit would join a model thread that may be stuck in a step
        # forever, and the supervisor must see this process end to restart it.
        os._exit(1)
    tracing.shutdown()
