"""The one thread that runs the model, so forward passes never block the event loop. It measures
what operators need: the queue of calls waiting for it and the fraction of time it is busy."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")
BUSY_WINDOW_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Timed(Generic[T]):
    value: T
    queued_seconds: float  # waiting for the thread
    run_seconds: float  # running on it
    started_unix: float  # wall clock when it started running


class ModelThread:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._lock = threading.Lock()
        self._intervals: deque[tuple[float, float]] = deque()
        self._running_since: float | None = None
        self.queued = 0
        self.busy_seconds_total = 0.0

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return (await self.run_timed(fn, *args, **kwargs)).value

    async def run_timed(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Timed[T]:
        submitted = time.perf_counter()
        with self._lock:
            self.queued += 1

        def timed() -> Timed[T]:
            started, started_unix = time.perf_counter(), time.time()
            with self._lock:
                self.queued -= 1
                self._running_since = started
            try:
                value = fn(*args, **kwargs)
            finally:
                self._record(started, time.perf_counter())
            return Timed(value, started - submitted, time.perf_counter() - started, started_unix)

        future = self._executor.submit(timed)
        future.add_done_callback(self._unqueue_if_cancelled)
        return await asyncio.wrap_future(future)

    def _unqueue_if_cancelled(self, future: Future[Any]) -> None:
        """A job cancelled while it waited (its caller went away) never ran `timed`: it leaves the queue here."""
        if future.cancelled():
            with self._lock:
                self.queued -= 1

    def _record(self, started: float, finished: float) -> None:
        with self._lock:
            self._running_since = None
            self.busy_seconds_total += finished - started
            self._intervals.append((started, finished))
            horizon = finished - BUSY_WINDOW_SECONDS
            while self._intervals and self._intervals[0][1] < horizon:
                self._intervals.popleft()

    def busy_fraction(self) -> float:
        """Share of the last BUSY_WINDOW_SECONDS the thread spent running the model."""
        now = time.perf_counter()
        horizon = now - BUSY_WINDOW_SECONDS
        with self._lock:
            busy = sum(end - max(start, horizon) for start, end in self._intervals if end > horizon)
            if self._running_since is not None:
                busy += now - max(self._running_since, horizon)
        return min(1.0, busy / BUSY_WINDOW_SECONDS)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
