"""Tracing and metrics shared by the four services.

Tracing uses the OpenTelemetry SDK configured by the standard variables: OTEL_TRACES_EXPORTER
(`otlp`, `console`, `none`; comma separated; default `none` here because a laptop has no collector),
OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER / _ARG, OTEL_BSP_*. W3C trace
context travels in gRPC metadata: a client interceptor on every inter-service channel injects it
and `grpc_edge` extracts it, so one request is one trace across the four services.

Metrics are Prometheus collectors in a per-service registry served over HTTP at /metrics.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def setup_tracing(service: str) -> TracerProvider:
    """Install the global TracerProvider for this process, per the OTEL_* variables."""
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)})
    provider = TracerProvider(resource=resource)
    for name in filter(None, (n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "none").split(","))):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name != "none":
            raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: use otlp, console or none")
    trace.set_tracer_provider(provider)
    return provider


def perf_to_unix_nanos(perf_seconds: float) -> int:
    """A time.perf_counter() reading as wall-clock Unix nanoseconds (for spans timed after the fact)."""
    return int((time.time() - time.perf_counter() + perf_seconds) * 1e9)


def incoming_context(context: grpc.aio.ServicerContext) -> Any:
    """The trace context a caller sent in its metadata."""
    return propagate.extract({key: value for key, value in (context.invocation_metadata() or ())
                              if isinstance(value, str)})


def _with_trace_context(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *carrier.items())
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


# grpc.aio files an interceptor under the first call kind it implements, so each kind needs its own class.
class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return await continuation(_with_trace_context(details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any) -> Any:
        return await continuation(_with_trace_context(details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Callable, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_trace_context(details), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Callable, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_trace_context(details), request_iterator)


def client_interceptors() -> list[Any]:
    """Interceptors that add the current trace context (traceparent) to every outgoing call."""
    return [_UnaryUnary(), _UnaryStream(), _StreamUnary(), _StreamStream()]


@dataclass(frozen=True, slots=True)
class ServiceTelemetry:
    """What every servicer edge records: a server span per call and its final status."""

    service: str
    registry: CollectorRegistry
    tracer: trace.Tracer
    requests: Counter
    latency: Histogram


def service_telemetry(service: str) -> ServiceTelemetry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, CPU seconds, open fds
    requests = Counter("disagg_rpc_requests", "RPCs handled, by method and final gRPC status code",
                       ["service", "method", "code"], registry=registry)
    latency = Histogram("disagg_rpc_duration_seconds", "RPC handling time, by method", ["service", "method"],
                        buckets=LATENCY_BUCKETS, registry=registry)
    return ServiceTelemetry(service, registry, trace.get_tracer(f"disagg.{service}"), requests, latency)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> Callable[[], None]:
    """Serve /metrics over HTTP; returns a function that stops it. Port 0 disables it."""
    if port == 0:
        return lambda: None
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        thread.join(timeout=5)
    return stop
