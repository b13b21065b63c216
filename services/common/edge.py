"""The servicer edge: every RPC handler is wrapped by `grpc_edge`, which

- continues the caller's trace (W3C traceparent in the metadata) with a SERVER span named
  `<service>.<Method>`, whose status is ERROR when the call fails;
- maps exceptions to a gRPC status through the one table in `errors` (upstream gRPC errors keep
  their code);
- counts the call by final status code and times it (Prometheus);
- counts it as in flight in the server's Lifecycle, so SIGTERM drains wait for it, and refuses calls
  that start new work once the drain has begun.

A servicer using it has `telemetry: ServiceTelemetry` and `lifecycle: Lifecycle` attributes.

A streamed call's span is the current one only while the handler runs, never across a yield:
grpc.aio does not resume a handler whose call ended while a write waited (the client stopped
reading, then cancelled), and the event loop closes it later from another task, where a context
attached before the yield cannot be detached. A streaming handler keeps to the same rule: around
its yields it opens spans with `start_span` and ends them, it does not make them current. Such an
abandoned stream ends as CANCELLED.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.common.errors import FAULT_ROLE_KEY, UpstreamError, status_of
from services.common.telemetry import ServiceTelemetry, incoming_context

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


class _Call:
    """One RPC being handled: its span, timing and final code."""

    def __init__(self, telemetry: ServiceTelemetry, method: str, context: grpc.aio.ServicerContext) -> None:
        self._telemetry = telemetry
        self._method = method
        self._started = time.perf_counter()
        self.span = telemetry.tracer.start_span(
            f"{telemetry.service}.{method}", context=incoming_context(context), kind=SpanKind.SERVER,
            record_exception=False, set_status_on_exception=False)
        self.code = grpc.StatusCode.OK

    @contextmanager
    def current(self) -> Iterator[None]:
        """The call's span as the current one, for a stretch of handler code without a yield."""
        with trace.use_span(self.span, record_exception=False, set_status_on_exception=False):
            yield

    def failed(self, error: BaseException) -> tuple[grpc.StatusCode, str]:
        if isinstance(error, asyncio.CancelledError):
            self.code, details = grpc.StatusCode.CANCELLED, "cancelled by the caller"
        elif isinstance(error, GeneratorExit):
            self.code, details = grpc.StatusCode.CANCELLED, "the call ended while a streamed message waited"
        else:
            self.code, details = status_of(error)
        if self.code == grpc.StatusCode.INTERNAL:
            log.exception("unexpected error", exc_info=error)
        else:
            log.info("%s failed: %s %s", self._method, self.code.name, details)
        self.span.set_status(Status(StatusCode.ERROR, f"{self.code.name}: {details}"))
        self.span.set_attribute("rpc.grpc.status_code", self.code.value[0])
        return self.code, details

    def close(self) -> None:
        telemetry = self._telemetry
        telemetry.requests.labels(telemetry.service, self._method, self.code.name).inc()
        telemetry.latency.labels(telemetry.service, self._method).observe(time.perf_counter() - self._started)
        self.span.end()


def grpc_edge(*, new_work: bool) -> Callable[[F], F]:
    """Wrap a unary, server-streaming or client-streaming handler (see the module docstring).
    `new_work`: the call starts new work, refused with UNAVAILABLE while the server drains; other
    calls (parts of work already admitted, status queries) are served until the server stops.
    Either way the call counts as in flight, so a drain waits for it."""

    def wrap(handler: F) -> F:
        method = handler.__name__

        if inspect.isasyncgenfunction(handler):
            @functools.wraps(handler)
            async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with _edge(self, method, context, new_work) as call:
                    items = handler(self, request, context)
                    try:
                        while True:
                            with call.current():
                                try:
                                    item = await anext(items)
                                except StopAsyncIteration:
                                    return
                            yield item
                    finally:
                        with call.current():
                            await items.aclose()
            return stream  # type: ignore[return-value]

        @functools.wraps(handler)
        async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _edge(self, method, context, new_work) as call:
                with call.current():
                    return await handler(self, request, context)
        return unary  # type: ignore[return-value]

    return wrap


@asynccontextmanager
async def _edge(servicer: Any, method: str, context: grpc.aio.ServicerContext, new_work: bool) -> AsyncIterator[_Call]:
    """One call handled: traced, timed, counted in flight, its failure turned into a status."""
    call = _Call(servicer.telemetry, method, context)
    try:
        with servicer.lifecycle.work(new=new_work):
            yield call
    except (asyncio.CancelledError, GeneratorExit) as error:
        with call.current():  # logged under the call's trace
            call.failed(error)
        raise
    except Exception as error:  # noqa: BLE001 - the edge reports every failure
        with call.current():
            await _abort(context, call, error)
    finally:
        call.close()


async def _abort(context: grpc.aio.ServicerContext, call: _Call, error: Exception) -> None:
    """End the call with the error's status; an upstream worker's fault is named in the trailers."""
    if isinstance(error, UpstreamError):
        context.set_trailing_metadata(((FAULT_ROLE_KEY, error.role),))
    await context.abort(*call.failed(error))
