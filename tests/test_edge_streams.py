"""A server-streaming call cancelled while gRPC waits to send (the client stopped reading, flow
control holds the write): the handler is left suspended at a yield and grpc.aio never resumes it,
so it is closed later, from another task, when the event loop finalizes it. Two defects came from
that, each proved below on a real gRPC server on loopback with the real `grpc_edge` and the
OpenTelemetry SDK:

- the edge kept its span attached as the current context across the handler's yields, so the
  detach ran in another context: OpenTelemetry logged "Failed to detach context" with a traceback
  at ERROR level for every such call (seen at every decode shutdown with a stream in flight);
- the edge only saw GeneratorExit, not CancelledError, so the abandoned call was counted and traced
  as OK.

The decode's Generate handler had the first defect of its own: its generation span was current
across its yields. Once spans stopped being current across yields, the edge's failure log line lost its trace
id: it is written under the call's span again.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.common.edge import grpc_edge
from services.common.runtime import ModelRuntime
from services.common.server import Lifecycle
from services.common.telemetry import ServiceTelemetry
from services.decode.servicer import DecodeServicer
from tests.engine_harness import started

CHUNK = bytes(256 * 1024)  # a few of these fill the HTTP/2 windows
DEADLINE_S = 10.0


class _Streamer:
    """A servicer whose one method sends chunks until the call ends."""

    def __init__(self, tracer: trace.Tracer) -> None:
        registry = CollectorRegistry()
        self.telemetry = ServiceTelemetry(
            "edgetest", registry, tracer,
            Counter("calls", "calls by code", ["service", "method", "code"], registry=registry),
            Histogram("call_seconds", "call time", ["service", "method"], registry=registry))
        self.lifecycle = Lifecycle()
        self.sent = 0
        self.spans_seen: list[str] = []
        self.closed = asyncio.Event()

    @grpc_edge(new_work=True)
    async def Stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            while True:
                self.spans_seen.append(trace.get_current_span().name)  # type: ignore[attr-defined]
                self.sent += 1
                yield CHUNK
        finally:
            self.closed.set()

    def code_count(self, code: str) -> float:
        return self.telemetry.registry.get_sample_value(
            "calls_total", {"service": "edgetest", "method": "Stream", "code": code}) or 0.0


async def _until_the_writes_block(streamer: _Streamer) -> None:
    """Until the handler stops producing: gRPC holds its write for the reader."""
    deadline, last = time.monotonic() + DEADLINE_S, -1
    while streamer.sent != last:
        if time.monotonic() > deadline:
            raise TimeoutError("the server never blocked on flow control")
        last = streamer.sent
        await asyncio.sleep(0.3)


async def _until_closed(streamer: _Streamer) -> None:
    """Until the handler's finally ran: the event loop closes it once nothing holds it (collected
    here too, should a reference cycle hold it)."""
    deadline = time.monotonic() + DEADLINE_S
    while not streamer.closed.is_set():
        if time.monotonic() > deadline:
            raise TimeoutError("the abandoned handler was never closed")
        gc.collect()
        await asyncio.sleep(0.05)


@dataclass(slots=True)
class _Abandoned:
    """What one abandoned call left: the detach errors logged, the spans, the servicer."""

    detach_errors: list[logging.LogRecord]
    spans: list[ReadableSpan]
    streamer: _Streamer
    failure_traces: list[int]  # the current trace id when the edge logged the call's failure


class _FailureTraces(logging.Handler):
    """The current span's trace id at each of the edge's "... failed" lines (what the services'
    log filter writes)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.traces: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if " failed: " in record.getMessage():
            self.traces.append(trace.get_current_span().get_span_context().trace_id)


@pytest.fixture
async def abandoned(caplog: pytest.LogCaptureFixture) -> _Abandoned:
    """A stream read once, left until its writes block, then cancelled by the client."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    streamer = _Streamer(provider.get_tracer("edgetest"))
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "edgetest.Edge", {"Stream": grpc.unary_stream_rpc_method_handler(streamer.Stream)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    caplog.set_level(logging.ERROR, logger="opentelemetry.context")
    failures, edge_log = _FailureTraces(), logging.getLogger("services.common.edge")
    edge_log.addHandler(failures)
    level, edge_log.level = edge_log.level, logging.INFO
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream("/edgetest.Edge/Stream")(b"")
            assert await call.read() == CHUNK
            await _until_the_writes_block(streamer)
            call.cancel()
            await _until_closed(streamer)
        await asyncio.sleep(0.1)  # let a finalizer's log line land
    finally:
        await server.stop(None)
        edge_log.removeHandler(failures)
        edge_log.setLevel(level)
    return _Abandoned(_detach_errors(caplog), list(exporter.get_finished_spans()), streamer, failures.traces)


def _detach_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if "Failed to detach context" in record.getMessage()]


async def test_an_abandoned_stream_detaches_its_span_without_an_error(abandoned: _Abandoned) -> None:
    assert abandoned.detach_errors == []
    assert [span.name for span in abandoned.spans] == ["edgetest.Stream"]
    assert set(abandoned.streamer.spans_seen) == {"edgetest.Stream"}  # the handler ran under the call's span
    assert abandoned.streamer.lifecycle.in_flight == 0


async def test_an_abandoned_streams_failure_is_logged_under_its_trace(abandoned: _Abandoned) -> None:
    [span] = abandoned.spans
    assert abandoned.failure_traces == [span.context.trace_id]  # the trace id its log line carries


async def test_an_abandoned_stream_is_counted_and_traced_as_cancelled(abandoned: _Abandoned) -> None:
    [span] = abandoned.spans
    assert span.status.status_code is StatusCode.ERROR and "CANCELLED" in (span.status.description or "")
    assert abandoned.streamer.code_count("CANCELLED") == 1 and abandoned.streamer.code_count("OK") == 0


async def test_a_decode_generation_closed_from_another_task_detaches_without_an_error(
        tiny: ModelRuntime, caplog: pytest.LogCaptureFixture) -> None:
    """What the event loop does to a Generate stream abandoned at a yield, on the real engine."""
    caplog.set_level(logging.ERROR, logger="opentelemetry.context")
    async with started(tiny) as harness:
        sequence = harness.admit("abandoned", max_tokens=50)
        harness.engine.prefill_locally(sequence)
        generation = DecodeServicer._generation(harness.engine, sequence)

        async def first_event() -> None:  # in a task of its own: a context of its own
            await anext(generation)
        await asyncio.create_task(first_event())
        await generation.aclose()
        harness.engine.release(sequence)
    assert _detach_errors(caplog) == []
