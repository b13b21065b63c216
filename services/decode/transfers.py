"""Background KV moves of the decode worker (a local prefill or store load filling a new sequence, a
swap-out to the kvstore, a swap-in or recompute), as objects the scheduler polls: a transfer runs as
a tracked task, never blocks its owner, and reports PENDING, DONE or FAILED (the way SGLang's
disaggregation transfer objects are polled)."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from services.common.tasks import TaskSet

T = TypeVar("T")


class Poll(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class Transfer(Generic[T]):
    def __init__(self, task: asyncio.Task[T] | None = None, value: T | None = None) -> None:
        self._task = task
        self._value = value

    @classmethod
    def start(cls, tasks: TaskSet, work: Coroutine[Any, Any, T], name: str,
              on_done: Callable[[], None]) -> Transfer[T]:
        """Run `work` in the background; `on_done` is called (on the event loop) when it ends."""
        task = tasks.spawn(work, name)
        task.add_done_callback(lambda _: on_done())
        return cls(task)

    @classmethod
    def finished(cls, value: T) -> Transfer[T]:
        """A transfer with nothing to move (for example a swap-out without a kvstore)."""
        return cls(None, value)

    def poll(self) -> Poll:
        if self._task is None:
            return Poll.DONE
        if not self._task.done():
            return Poll.PENDING
        return Poll.FAILED if self._task.cancelled() or self._task.exception() is not None else Poll.DONE

    def result(self) -> T:
        return self._task.result() if self._task is not None else self._value  # type: ignore[return-value]

    def error(self) -> BaseException:
        if self._task is None or self._task.cancelled():
            return asyncio.CancelledError("transfer cancelled")
        return self._task.exception() or RuntimeError("transfer has not failed")

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def settled(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds) until the transfer has ended, however it ended."""
        if self._task is not None and not self._task.done():
            await asyncio.wait([self._task], timeout=timeout)
