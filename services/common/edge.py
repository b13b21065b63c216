"""The servicer edge: every RPC handler is wrapped by `grpc_edge`, which

- continues the caller's trace (W3C traceparent in the metadata) with a SERVER span named
  `<service>.<Method>`, whose status is ERROR when the call fails;
- maps exceptions to a gRPC status through the one table in `errors` (upstream gRPC errors keep
  their code);
- counts the call by final status code and times it (Prometheus).

A servicer using it has a `telemetry: ServiceTelemetry` attribute.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.common.errors import status_of
from services.common.telemetry import ServiceTelemetry, incoming_context

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


class _Call:
    """One RPC being handled: its span, timing and final code."""

    def __init__(self, telemetry: ServiceTelemetry, method: str, context: grpc.aio.ServicerContext) -> None:
        self._telemetry = telemetry
        self._method = method
        self._started = time.perf_counter()
        self._span_manager = telemetry.tracer.start_as_current_span(
            f"{telemetry.service}.{method}", context=incoming_context(context), kind=SpanKind.SERVER,
            record_exception=False, set_status_on_exception=False)
        self.span = self._span_manager.__enter__()
        self.code = grpc.StatusCode.OK

    def failed(self, error: BaseException) -> tuple[grpc.StatusCode, str]:
        if isinstance(error, asyncio.CancelledError):
            self.code, details = grpc.StatusCode.CANCELLED, "cancelled by the caller"
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
        self._span_manager.__exit__(None, None, None)


def grpc_edge(handler: F) -> F:
    """Wrap a unary, server-streaming or client-streaming handler (see the module docstring)."""
    method = handler.__name__

    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Call(self.telemetry, method, context)
            try:
                async for item in handler(self, request, context):
                    yield item
            except asyncio.CancelledError as error:
                call.failed(error)
                raise
            except Exception as error:  # noqa: BLE001 - the edge reports every failure
                await context.abort(*call.failed(error))
            finally:
                call.close()
        return stream  # type: ignore[return-value]

    @functools.wraps(handler)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(self.telemetry, method, context)
        try:
            return await handler(self, request, context)
        except asyncio.CancelledError as error:
            call.failed(error)
            raise
        except Exception as error:  # noqa: BLE001 - the edge reports every failure
            await context.abort(*call.failed(error))
        finally:
            call.close()
    return unary  # type: ignore[return-value]

