"""`unless_disconnected`, the gateway's watch on an HTTP client while its response is prepared: a
hang-up cancels the work and waits for its cleanup; anything else that cancels the work is not
taken for a hang-up; the handler's own cancellation still waits for the work's cleanup.
(The running stack's side: test_openai_api.py::test_hanging_up_on_a_whole_response_frees_everything.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.common.errors import BackendUnavailable
from services.gateway.disconnect import ClientDisconnected, unless_disconnected


class Channel:
    """An ASGI receive channel whose messages the test sends."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def receive(self) -> dict[str, Any]:
        return await self.messages.get()

    def hang_up(self) -> None:
        self.messages.put_nowait({"type": "http.disconnect"})


async def test_the_work_s_result_when_the_client_stays() -> None:
    channel = Channel()

    async def work() -> str:
        await asyncio.sleep(0.01)
        return "answer"

    assert await unless_disconnected(channel.receive, work()) == "answer"


async def test_the_work_s_own_error_when_the_client_stays() -> None:
    async def work() -> str:
        raise ValueError("bad field")

    with pytest.raises(ValueError, match="bad field"):
        await unless_disconnected(Channel().receive, work())


async def test_a_hang_up_cancels_the_work_after_its_cleanup() -> None:
    channel, steps = Channel(), []

    async def work() -> str:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.05)  # closing its calls takes a moment
            steps.append("cleaned up")
        return "never"

    asyncio.get_running_loop().call_later(0.05, channel.hang_up)
    with pytest.raises(ClientDisconnected):
        await unless_disconnected(channel.receive, work())
    assert steps == ["cleaned up"]


async def test_a_body_message_after_the_body_is_not_a_hang_up() -> None:
    channel = Channel()
    channel.messages.put_nowait({"type": "http.request", "body": b"", "more_body": False})

    async def work() -> str:
        await asyncio.sleep(0.05)
        return "answer"

    assert await unless_disconnected(channel.receive, work()) == "answer"


async def test_work_cancelled_from_within_is_unavailable_not_a_hang_up() -> None:
    """A gRPC call raises CancelledError when its channel is closed under it (shutdown): the client,
    still connected, gets a retryable 503, not a 499 for a hang-up it never made."""
    async def work() -> str:
        raise asyncio.CancelledError

    with pytest.raises(BackendUnavailable):
        await unless_disconnected(Channel().receive, work())


async def test_a_hang_up_is_reported_even_if_the_work_s_cleanup_fails() -> None:
    channel = Channel()

    async def work() -> str:
        try:
            await asyncio.sleep(60)
        finally:
            raise RuntimeError("closing a call failed")

    asyncio.get_running_loop().call_later(0.05, channel.hang_up)
    with pytest.raises(ClientDisconnected):
        await unless_disconnected(channel.receive, work())


async def test_the_handler_s_own_cancellation_waits_for_the_work_s_cleanup() -> None:
    """The server cancels the handler (its shutdown timeout) while the work, cancelled by a hang-up,
    still closes its calls: the handler must not go on (to close the same generator: "already
    running") until the work is done."""
    channel, steps = Channel(), []

    async def work() -> str:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.3)
            steps.append("cleaned up")
        return "never"

    handler = asyncio.ensure_future(unless_disconnected(channel.receive, work()))
    await asyncio.sleep(0.05)
    channel.hang_up()
    await asyncio.sleep(0.1)  # the work is now cleaning up
    handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert steps == ["cleaned up"]
