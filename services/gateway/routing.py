"""Worker choice: the live table of one role's workers, their state and their load.

A worker's state (gateway.proto WorkerState):
  unknown      just joined; its health has not answered yet
  serving      its health watch says SERVING and no call failure is pending: requests go to it
  not_serving  its health says NOT_SERVING: loading its model, or draining after SIGTERM
  unreachable  its health watch broke or cannot connect (re-established with backoff)
  backoff      a call to it failed at the transport level (`report_failure`): skipped until the
               capped exponential backoff has passed AND a health check passes again
Only serving workers are routed to; the least loaded first (requests this gateway has in flight on
each), ties rotated so load spreads. The health watches and the recovery checks are the
`Watcher`'s (services/gateway/health_watch.py); this module is bookkeeping only.
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from services.common.backoff import Backoff
from services.common.errors import BackendUnavailable

log = logging.getLogger(__name__)


class WorkerState(enum.Enum):
    UNKNOWN = "unknown"
    SERVING = "serving"
    NOT_SERVING = "not_serving"
    UNREACHABLE = "unreachable"
    BACKOFF = "backoff"


@dataclass(slots=True)
class Worker:
    address: str
    role: str
    active: int = 0  # requests this gateway has in flight on it
    health: WorkerState = WorkerState.UNKNOWN  # what its health watch says
    failures: int = 0  # reported failures and failed recovery checks in the current streak
    retry_at: float | None = None  # while a failure is pending: when a health check may clear it
    last_failure: str = ""
    last_failure_at: float = 0.0

    @property
    def state(self) -> WorkerState:
        return WorkerState.BACKOFF if self.retry_at is not None else self.health

    @property
    def routable(self) -> bool:
        return self.state is WorkerState.SERVING

    def backoff_left(self, now: float) -> float:
        return max(0.0, self.retry_at - now) if self.retry_at is not None else 0.0


class Watcher(Protocol):
    """Follows workers' health for a pool (services/gateway/health_watch.py)."""

    def watch(self, pool: WorkerPool, worker: Worker) -> None: ...

    def forget(self, worker: Worker) -> None: ...

    def recover(self, pool: WorkerPool, worker: Worker) -> None: ...


class WorkerPool:
    def __init__(self, role: str, failure_backoff: Backoff, watcher: Watcher,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.role = role
        self._backoff = failure_backoff
        self._watcher = watcher
        self._on_change = on_change
        self._workers: dict[str, Worker] = {}
        self._turn = itertools.count()

    @property
    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    @property
    def serving(self) -> bool:
        return any(worker.routable for worker in self._workers.values())

    def update(self, addresses: Sequence[str]) -> None:
        """Make the workers exactly `addresses`: a new one starts unknown (not routed to until its
        health says SERVING); one that left is forgotten (requests already on it go on)."""
        wanted = list(dict.fromkeys(addresses))
        if wanted == list(self._workers):
            return
        current, self._workers = self._workers, {}
        for address in wanted:
            worker = current.pop(address, None)
            if worker is None:
                worker = Worker(address, self.role)
                log.info("%s worker %s joined", self.role, address)
                self._watcher.watch(self, worker)
            self._workers[address] = worker
        for worker in current.values():
            log.info("%s worker %s left", self.role, worker.address)
            self._watcher.forget(worker)
        self._on_change()

    def ranked(self) -> list[Worker]:
        """Serving workers from least to most loaded; ties rotate so load spreads. Raises
        BackendUnavailable naming the role when none is serving."""
        workers = [worker for worker in self._workers.values() if worker.routable]
        if not workers:
            raise BackendUnavailable(self._none_serving())
        offset = next(self._turn) % len(workers)
        rotated = workers[offset:] + workers[:offset]
        return sorted(rotated, key=lambda worker: worker.active)

    def _none_serving(self) -> str:
        workers = self._workers.values()
        if not workers:
            return f"no {self.role} worker is configured; retry later"
        states = ", ".join(f"{n} {state}" for state, n in Counter(w.state.value for w in workers).items())
        failed = [w for w in workers if w.state is WorkerState.BACKOFF and w.last_failure]
        last = max(failed, key=lambda w: w.last_failure_at, default=None)
        cause = f"; last failure {last.address}: {last.last_failure}" if last else ""
        return f"no {self.role} worker is serving ({states}{cause}); retry later"

    def set_health(self, worker: Worker, health: WorkerState) -> None:
        """What the worker's health watch says now. A worker that turns SERVING again (restarted,
        reconnected) while a failure is pending is checked as soon as its first backoff is over."""
        if worker.health is not health and self._workers.get(worker.address) is worker:
            log.info("%s worker %s health: %s (was %s)", self.role, worker.address, health.value,
                     worker.health.value)
            worker.health = health
            if health is WorkerState.SERVING and worker.retry_at is not None:
                worker.failures = 0
                worker.retry_at = min(worker.retry_at, worker.last_failure_at + self._backoff.initial_seconds)
            self._on_change()

    def report_failure(self, address: str, reason: str) -> None:
        """A call to the worker failed at the transport level (UNAVAILABLE, or a prefill past its
        deadline): skip it until the backoff has passed and a health check passes again."""
        worker = self._workers.get(address)
        if worker is None:
            return
        now = time.monotonic()
        worker.last_failure = reason
        if worker.retry_at is None:  # a new incident; reports while one is pending add nothing
            if now - worker.last_failure_at > self._backoff.max_seconds:
                worker.failures = 0  # the earlier streak is long over
            self._fail(worker, now)
            log.warning("%s worker %s failed (%s); skipped for %.1fs and until its health check passes",
                        self.role, address, reason, worker.backoff_left(now))
            self._watcher.recover(self, worker)
            self._on_change()
        worker.last_failure_at = now

    def checked(self, worker: Worker, passed: bool) -> None:
        """The recovery health check's verdict, once the backoff has passed."""
        if worker.retry_at is None:
            return
        if passed:
            worker.retry_at = None
            log.info("%s worker %s passed its health check; routable again", self.role, worker.address)
            self._on_change()
        else:
            self._fail(worker, time.monotonic())

    def _fail(self, worker: Worker, now: float) -> None:
        worker.retry_at = now + self._backoff.delay(worker.failures)
        worker.failures += 1

    @staticmethod
    @contextmanager
    def lease(worker: Worker) -> Iterator[Worker]:
        """Count a request on `worker` while the context is open."""
        worker.active += 1
        try:
            yield worker
        finally:
            worker.active -= 1
