"""A streamed HTTP response that fails after its first event: the error goes into the stream and
onto the request's span (the OpenTelemetry SDK, in-memory exporter). The stream runs in the
response's own task, outside the span's context: the span used to be looked up as the current
one there, which is none, so the failure never reached the trace."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from services.common.errors import BackendUnavailable
from services.gateway.http_api import _sse
from services.gateway.openai_formats import CompletionFormat, Indexed
from services.gateway.outputs import GenerateOutput


async def _failing_after_one() -> AsyncGenerator[Indexed, None]:
    yield 0, GenerateOutput([11], " world")
    raise BackendUnavailable("the decode worker went away")


async def test_a_stream_that_fails_after_its_first_token_marks_its_span_as_error() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    span = provider.get_tracer("test").start_span("gateway.http.completions")
    events = [event async for event in _sse((0, GenerateOutput([10], "Hello")), _failing_after_one(),
                                            CompletionFormat("cmpl-1", "model"), 0, span.end, span)]
    assert events[-1] == "data: [DONE]\n\n"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert "the decode worker went away" in error["message"]
    [finished] = exporter.get_finished_spans()
    assert finished.status.status_code is StatusCode.ERROR
    assert "the decode worker went away" in (finished.status.description or "")
