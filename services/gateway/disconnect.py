"""Stop a request's work when its HTTP client hangs up before the response starts.

A completion sent whole (`stream: false`), and a streamed one until its first token, is awaited in
the route handler. uvicorn does not cancel a handler whose client went away: without this the
prefill and decode would go on for nobody, to the last token (vLLM's `with_cancellation` does the
same). Once a streamed response has started, Starlette's StreamingResponse watches the connection
itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]  # an ASGI receive channel
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client hung up; logs and traces only


class ClientDisconnected(Exception):
    """The HTTP client closed its connection before the response started."""


async def unless_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """`work`'s result; if the client disconnects first, `work` is cancelled (its cleanup awaited)
    and ClientDisconnected raised. Call it after the request body was read: from then on the
    channel's only message is the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and watcher.exception() is not None:
            log.warning("cannot watch the client's connection (%s); the request goes on", watcher.exception())
            await task
    finally:
        await _cancel(task, watcher)
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # more of a body that was already read: nothing to wait for


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    """Cancel what is still running and wait until it has finished cleaning up."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
