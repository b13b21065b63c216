"""What a prefill leaves behind: its summary, spans (`prefill.queue_wait`, `prefill.forward`,
`prefill.kv_send`) and metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from services.common.kv_codec import KvLayout
from services.common.metrics import PrefillMetrics
from services.common.model_thread import Timed
from services.common.telemetry import perf_to_unix_nanos

tracer = trace.get_tracer("disagg.prefill")


@dataclass(frozen=True, slots=True)
class PrefillSummary:
    kv_bytes: int
    chunk_count: int
    forward_seconds: float
    transfer_seconds: float
    handoff_seconds: float
    stored: bool
    cached_tokens: int = 0  # leading prompt tokens taken from the prefix cache


def record_forward(metrics: PrefillMetrics, forward: Timed[Any], cached: int, computed: int) -> None:
    """The forward pass's spans (queue wait, forward with its cached and computed tokens) and metrics."""
    started = int(forward.started_unix * 1e9)
    tracer.start_span("prefill.queue_wait", start_time=started - int(forward.queued_seconds * 1e9)).end(
        end_time=started)
    tracer.start_span("prefill.forward", start_time=started, attributes={
        "prefill.cached_tokens": cached, "prefill.computed_tokens": computed}).end(
        end_time=started + int(forward.run_seconds * 1e9))
    metrics.queue_wait_seconds.observe(forward.queued_seconds)
    metrics.forward_seconds.observe(forward.run_seconds)


def record_send(metrics: PrefillMetrics, layout: KvLayout, summary: PrefillSummary, first_sent: float,
                finished: float) -> None:
    """The KV handoff's span and metrics."""
    throughput = summary.kv_bytes / max(summary.transfer_seconds, 1e-9)
    span = tracer.start_span("prefill.kv_send", start_time=perf_to_unix_nanos(first_sent), attributes={
        "kv.bytes": summary.kv_bytes, "kv.chunks": summary.chunk_count, "kv.chunk_tokens": layout.chunk_tokens,
        "kv.chunk_layers": layout.chunk_layers, "kv.encoding": layout.encoding, "kv.dtype": layout.dtype,
        "kv.throughput_bytes_per_second": throughput, "kv.handoff_seconds": summary.handoff_seconds,
        "kv.stored": summary.stored, "kv.sent_tokens": layout.sent_tokens,
        "kv.decode_cached_tokens": layout.token_start,
        "prefill.cached_tokens": summary.cached_tokens,
        "prefill.computed_tokens": layout.num_tokens - summary.cached_tokens})
    span.end(end_time=perf_to_unix_nanos(finished))
    metrics.kv_bytes_sent.inc(summary.kv_bytes)
    metrics.kv_throughput.observe(throughput)
    metrics.handoff_seconds.observe(summary.handoff_seconds)
