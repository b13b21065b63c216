"""Several generations as one stream (a completion request with a list of prompts): each stream
runs in its own task, items come out tagged with their stream's index as they arrive, the first
error ends the whole and closing it cancels every stream that is still running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Generic, TypeVar, cast

T = TypeVar("T")


class _Finished(Generic[T]):
    pass


_FINISHED: _Finished[object] = _Finished()


async def merged(streams: Sequence[AsyncIterator[T]]) -> AsyncGenerator[tuple[int, T], None]:
    if len(streams) == 1:  # the common case stays a plain iteration: no task, no queue
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, object, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((index, item, None))
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((index, _FINISHED, error))
            return
        queue.put_nowait((index, _FINISHED, None))

    tasks = [asyncio.get_running_loop().create_task(pump(i, s), name=f"fanout-{i}") for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, received, error = await queue.get()
            if error is not None:
                raise error
            if received is _FINISHED:
                running -= 1
            else:
                yield index, cast(T, received)  # anything but _FINISHED is an item of stream `index`
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            if hasattr(stream, "aclose"):
                await stream.aclose()  # type: ignore[attr-defined]
