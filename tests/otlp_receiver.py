"""A real OTLP/gRPC trace receiver for tests, built from the opentelemetry-proto service definitions."""

from __future__ import annotations

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2


class SpanSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span with its service.name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, trace_pb2.Span]] = []

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
                     context: grpc.aio.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                self.spans.extend((attributes.get("service.name", "?"), span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace_of(self, service: str, name: str, label: str) -> bytes | None:
        """The trace of the request the client labelled `label` (its own request id)."""
        for owner, span in self.spans:
            attributes = {a.key: a.value.string_value for a in span.attributes}
            if owner == service and span.name == name and attributes.get("request.label") == label:
                return span.trace_id
        return None

    def in_trace(self, trace_id: bytes) -> list[tuple[str, trace_pb2.Span]]:
        return [(owner, span) for owner, span in self.spans if span.trace_id == trace_id]


async def start_receiver() -> tuple[SpanSink, grpc.aio.Server, int]:
    sink = SpanSink()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return sink, server, port
