"""Prefill batching: queued prompts are grouped into one forward pass, up to a token budget,
waiting at most a short time for company. A prompt that arrives alone runs by itself (exactly as
the model's own forward pass computes it)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from services.common.model_thread import ModelThread, Timed
from services.common.runtime import LayerKvCallback, ModelRuntime
from services.common.tasks import TaskSet


@dataclass(slots=True)
class _Pending:
    prompt_ids: list[int]
    on_layer: LayerKvCallback
    result: asyncio.Future[Timed[torch.Tensor]]


class PrefillBatcher:
    def __init__(self, runtime: ModelRuntime, thread: ModelThread, token_budget: int, max_wait_seconds: float,
                 on_batch: Callable[[int], None]) -> None:
        self._runtime = runtime
        self._thread = thread
        self._budget = token_budget
        self._max_wait = max_wait_seconds
        self._on_batch = on_batch  # told each batch's size (metrics)
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._held: deque[_Pending] = deque()  # did not fit the previous batch
        self._tasks = TaskSet()

    async def forward(self, prompt_ids: list[int], on_layer: LayerKvCallback) -> Timed[torch.Tensor]:
        if not self._tasks:
            self._tasks.spawn(self._run(), "prefill-batcher")
        pending = _Pending(prompt_ids, on_layer, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(pending)
        return await pending.result

    async def _next(self, timeout: float | None) -> _Pending:
        if self._held:
            return self._held.popleft()
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def _collect(self) -> list[_Pending]:
        batch = [await self._next(None)]
        tokens, deadline = len(batch[0].prompt_ids), time.monotonic() + self._max_wait
        while tokens < self._budget and (remaining := deadline - time.monotonic()) > 0:
            try:
                candidate = await self._next(remaining)
            except TimeoutError:
                break
            if tokens + len(candidate.prompt_ids) > self._budget:
                self._held.append(candidate)
                break
            batch.append(candidate)
            tokens += len(candidate.prompt_ids)
        return [pending for pending in batch if not pending.result.done()]

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                continue
            try:
                if len(batch) == 1:
                    timed: Timed[Any] = await self._thread.run_timed(self._runtime.prefill, batch[0].prompt_ids,
                                                                     batch[0].on_layer)
                    results = [timed.value]
                else:
                    timed = await self._thread.run_timed(self._runtime.prefill_batch,
                                                         [p.prompt_ids for p in batch], [p.on_layer for p in batch])
                    results = timed.value
            except Exception as error:  # noqa: BLE001 - every waiting request learns of it
                for pending in batch:
                    if not pending.result.done():
                        pending.result.set_exception(error)
                continue
            self._on_batch(len(batch))
            for pending, logits in zip(batch, results):
                if not pending.result.done():
                    pending.result.set_result(Timed(logits, timed.queued_seconds, timed.run_seconds,
                                                    timed.started_unix))

    async def close(self) -> None:
        await self._tasks.cancel_all()
