"""The gateway's view of each worker's health, kept live.

Each worker has one task following the standard `grpc.health.v1.Health/Watch` stream (service ""):
every status the worker pushes (SERVING, NOT_SERVING the moment it drains) is its health at once.
A watch that breaks (the worker died or cannot be reached) or does not answer within the health
timeout makes the worker unreachable and is re-established after a capped exponential backoff with
jitter (`--health-retry-max-seconds`); the call waits for the channel to connect, so a worker is
seen as soon as its port opens. A watch stream has a deadline too (WATCH_STREAM_SECONDS) and is
opened again at once when it expires.

After a reported failure (routing.WorkerPool.report_failure) a recovery task waits out the backoff,
then asks `Health/Check`; a failed check doubles the backoff (up to its cap) and tries again. A
worker whose watch turns SERVING again meanwhile (it restarted) is checked once its first backoff
is over.
Every task is in the gateway's TaskSet, cancelled when its worker leaves or the gateway stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.backoff import Backoff
from services.common.channels import ChannelPool
from services.common.tasks import TaskSet
from services.gateway.routing import Worker, WorkerPool, WorkerState

log = logging.getLogger(__name__)

WATCH_STREAM_SECONDS = 300.0  # deadline of one Watch stream; the next one opens at once
RECOVERY_TICK_SECONDS = 0.25  # how often a recovery looks again at its worker's backoff
_HEALTH = {health_pb2.HealthCheckResponse.SERVING: WorkerState.SERVING,
           health_pb2.HealthCheckResponse.NOT_SERVING: WorkerState.NOT_SERVING,
           health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: WorkerState.NOT_SERVING}


@dataclass(frozen=True, slots=True)
class HealthTiming:
    timeout_seconds: float  # a Health/Check, and the first answer of a Watch
    reconnect: Backoff  # between attempts to re-establish a broken Watch


@dataclass(frozen=True, slots=True)
class _WatchEnd:
    answered: bool  # the stream delivered at least one status
    expired: bool  # it ran out its own deadline (nothing is wrong with the worker)


class HealthWatcher:
    """Implements routing.Watcher over gRPC health."""

    def __init__(self, channels: ChannelPool, tasks: TaskSet, timing: HealthTiming) -> None:
        self._channels = channels
        self._tasks = tasks
        self._timing = timing
        self._watches: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._recoveries: dict[tuple[str, str], asyncio.Task[None]] = {}

    def watch(self, pool: WorkerPool, worker: Worker) -> None:
        key = (worker.role, worker.address)
        if key not in self._watches:
            self._watches[key] = self._tasks.spawn(self._watch_forever(pool, worker), f"health-watch {key}")

    def forget(self, worker: Worker) -> None:
        key = (worker.role, worker.address)
        for tasks in (self._watches, self._recoveries):
            task = tasks.pop(key, None)
            if task is not None:
                task.cancel()
        self._channels.discard(worker.address)  # requests still on it finish first

    def recover(self, pool: WorkerPool, worker: Worker) -> None:
        key = (worker.role, worker.address)
        task = self._recoveries.get(key)
        if task is None or task.done():
            self._recoveries[key] = self._tasks.spawn(self._recover(pool, worker), f"health-recover {key}")

    async def _watch_forever(self, pool: WorkerPool, worker: Worker) -> None:
        attempt = 0
        while True:
            try:
                end = await self._watch_once(pool, worker)
            except Exception:  # noqa: BLE001 - a watch must outlive any one stream's surprise
                log.exception("health watch of %s worker %s failed", worker.role, worker.address)
                end = _WatchEnd(answered=False, expired=False)
            if end.expired:
                continue
            pool.set_health(worker, WorkerState.UNREACHABLE)
            attempt = 0 if end.answered else attempt + 1
            await asyncio.sleep(self._timing.reconnect.delay(attempt))

    async def _watch_once(self, pool: WorkerPool, worker: Worker) -> _WatchEnd:
        """Follow one Watch stream until it ends."""
        stub = health_pb2_grpc.HealthStub(self._channels.get(worker.address))
        call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=WATCH_STREAM_SECONDS,
                          wait_for_ready=True)
        answered = False
        try:
            reply = await asyncio.wait_for(call.read(), self._timing.timeout_seconds)
            while reply is not grpc.aio.EOF:
                answered = True
                pool.set_health(worker, _HEALTH.get(reply.status, WorkerState.UNKNOWN))
                reply = await call.read()
        except TimeoutError:
            pass
        except grpc.aio.AioRpcError as error:
            return _WatchEnd(answered, answered and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED)
        finally:
            call.cancel()
        return _WatchEnd(answered, False)

    async def _recover(self, pool: WorkerPool, worker: Worker) -> None:
        while worker.retry_at is not None:
            wait = worker.retry_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(min(wait, RECOVERY_TICK_SECONDS))  # retry_at may come earlier
                continue
            pool.checked(worker, await self._check(worker))

    async def _check(self, worker: Worker) -> bool:
        stub = health_pb2_grpc.HealthStub(self._channels.get(worker.address))
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=self._timing.timeout_seconds)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING
