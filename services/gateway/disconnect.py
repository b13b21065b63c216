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
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any, TypeVar

from services.common.errors import BackendUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]  # an ASGI receive channel
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client hung up; logs and traces only
CLEANUP_SECONDS = 30.0  # how long cancelled work may take to close its calls before it is left behind


class ClientDisconnected(Exception):
    """The HTTP client closed its connection before the response started."""


async def unless_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """`work`'s result; if the client disconnects first, `work` is cancelled (its cleanup awaited)
    and ClientDisconnected raised. Work cancelled by anything else (a channel closed under it at
    shutdown) is BackendUnavailable, which a client may retry. Call it after the request body was
    read: from then on the channel's only message is the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and watcher.exception() is not None:
            log.warning("cannot watch the client's connection (%s); the request goes on", watcher.exception())
            await asyncio.wait((task,))
        hung_up = not task.done()  # the watcher saw the disconnect first
    finally:
        await _cancel(task, watcher)
    if hung_up:
        raise ClientDisconnected
    if task.cancelled():
        raise BackendUnavailable("the request's work was cancelled before it could answer")
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # more of a body that was already read: nothing to wait for


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    """Cancel what is still running and wait until it has finished cleaning up (closing its calls),
    even if this task is cancelled meanwhile (that cancellation is raised afterwards), for at most
    CLEANUP_SECONDS. A watcher's error nobody asked for is retrieved here."""
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    deadline, interrupted = time.monotonic() + CLEANUP_SECONDS, False
    while pending and (left := deadline - time.monotonic()) > 0:
        try:
            _, pending = await asyncio.wait(pending, timeout=left)
        except asyncio.CancelledError:
            interrupted = True
    if pending:
        log.error("cancelled request work still running after %.0f s; left behind", CLEANUP_SECONDS)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # marks it retrieved: the caller reads the work's own through result()
    if interrupted:
        raise asyncio.CancelledError
