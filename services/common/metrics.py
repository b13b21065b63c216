"""Prometheus collectors of each role, registered in the service's own registry."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.model_thread import ModelThread
from services.common.telemetry import LATENCY_BUCKETS

THROUGHPUT_BUCKETS = tuple(x * 1e9 for x in (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10))


def _gauge(registry: CollectorRegistry, name: str, doc: str, read: Callable[[], float]) -> Gauge:
    gauge = Gauge(name, doc, registry=registry)
    gauge.set_function(read)
    return gauge


def model_loop_gauges(registry: CollectorRegistry, thread: ModelThread) -> None:
    """Busy fraction and queue of the model thread: shows which phase is saturated."""
    _gauge(registry, "disagg_model_loop_busy_fraction", "share of the last 10 s the model thread was busy",
           thread.busy_fraction)
    _gauge(registry, "disagg_model_loop_queue_depth", "model calls waiting for the model thread",
           lambda: thread.queued)


@dataclass(frozen=True, slots=True)
class PrefillMetrics:
    forward_seconds: Histogram
    queue_wait_seconds: Histogram
    kv_bytes_sent: Counter
    kv_throughput: Histogram
    handoff_seconds: Histogram
    batch_size: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry, thread: ModelThread, active: Callable[[], int]) -> PrefillMetrics:
        model_loop_gauges(registry, thread)
        _gauge(registry, "disagg_prefill_active_requests", "requests being prefilled or handed off", active)
        return cls(
            Histogram("disagg_prefill_forward_seconds", "prompt forward pass time", buckets=LATENCY_BUCKETS,
                      registry=registry),
            Histogram("disagg_prefill_queue_wait_seconds", "time a prompt waited for the model thread",
                      buckets=LATENCY_BUCKETS, registry=registry),
            Counter("disagg_kv_transfer_bytes", "KV bytes sent to decode workers", registry=registry),
            Histogram("disagg_kv_transfer_throughput_bytes_per_second", "KV bytes per second of one transfer",
                      buckets=THROUGHPUT_BUCKETS, registry=registry),
            Histogram("disagg_kv_handoff_seconds", "forward pass end to complete KV acknowledged (prefill clock)",
                      buckets=LATENCY_BUCKETS, registry=registry),
            Histogram("disagg_prefill_batch_size", "prompts per batched forward pass",
                      buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry))


@dataclass(frozen=True, slots=True)
class DecodeMetrics:
    handoff_seconds: Histogram
    kv_bytes_received: Counter
    time_per_output_token: Histogram
    prefix_lookup_tokens: Counter
    prefix_hit_tokens: Counter
    prefix_evictions: Counter
    kv_bytes_saved: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry, thread: ModelThread) -> DecodeMetrics:
        model_loop_gauges(registry, thread)
        return cls(
            Histogram("disagg_kv_handoff_seconds", "prefill forward end to KV verified and sequence scheduled",
                      buckets=LATENCY_BUCKETS, registry=registry),
            Counter("disagg_kv_received_bytes", "KV bytes received and verified", registry=registry),
            Histogram("disagg_decode_time_per_output_token_seconds", "decode step time per token",
                      buckets=LATENCY_BUCKETS, registry=registry),
            Counter("disagg_decode_prefix_lookup_tokens", "prompt tokens looked up in the decode's prefix cache "
                    "(full blocks before the prompt's last token)", registry=registry),
            Counter("disagg_decode_prefix_hit_tokens", "prompt tokens found there (their KV is not transferred)",
                    registry=registry),
            Counter("disagg_decode_prefix_evictions", "cached blocks evicted to make room (least recently used "
                    "first)", registry=registry),
            Counter("disagg_kv_transfer_saved_bytes", "KV bytes (at the pool's dtype) a transfer did not carry "
                    "because this worker held them", registry=registry))


class HelperCollector(Collector):
    """The decode's helper threads' work at scrape time (services/decode/gemv_helpers.py): `counts`
    returns the blocks of their parts a helper computed, those the decode computed itself, and how
    many times the decode went on alone for a while, their cores being busy."""

    def __init__(self, counts: Callable[[], tuple[int, int, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        helped, taken, rests = self._counts()
        blocks = CounterMetricFamily("disagg_decode_helper_blocks", "blocks of the helper threads' parts of the "
                                     "decode's products, by who computed them", labels=["by"])
        blocks.add_metric(["helper"], helped)
        blocks.add_metric(["decode"], taken)
        yield blocks
        yield CounterMetricFamily("disagg_decode_helper_rests", "times the decode computed its next 512 products "
                                  "alone, the helpers having done under an eighth of their parts", value=rests)


def decode_load_gauges(registry: CollectorRegistry, load: Callable[[], DecodeLoad]) -> None:
    """Gauges of a decode engine's load, read at scrape time."""
    _gauge(registry, "disagg_kv_pool_pressure", "share of the decode worker's KV capacity in use",
           lambda: load().pressure)
    _gauge(registry, "disagg_kv_bytes_held", "KV bytes held by active requests", lambda: load().kv_bytes_held)
    _gauge(registry, "disagg_decode_running_batch_size", "sequences generating", lambda: load().running)
    _gauge(registry, "disagg_decode_queue_depth", "admitted requests waiting for their KV",
           lambda: load().awaiting_kv)
    _gauge(registry, "disagg_decode_prefix_cached_blocks", "KV pool blocks holding a cached prompt block",
           lambda: load().prefix_cached_blocks)
    _gauge(registry, "disagg_decode_prefix_evictable_blocks", "cached blocks no sequence uses (counted as free)",
           lambda: load().prefix_evictable_blocks)


@dataclass(frozen=True, slots=True)
class DecodeLoad:
    """A decode worker's load at one moment (Stats RPC and gauges)."""

    active: int
    awaiting_kv: int
    running: int
    kv_bytes_held: int
    pressure: float
    prefix_cached_blocks: int = 0
    prefix_evictable_blocks: int = 0


@dataclass(frozen=True, slots=True)
class GatewayMetrics:
    ttft: Histogram
    time_per_output_token: Histogram
    inter_token_latency: Histogram
    e2e_latency: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter
    prefill_retries: Counter
    prefills: Counter  # by where: prefill_worker / decode_worker (--prefill-mode)

    @classmethod
    def create(cls, registry: CollectorRegistry, active: Callable[[], int]) -> GatewayMetrics:
        _gauge(registry, "disagg_gateway_active_requests", "Generate calls in flight", active)
        return cls(
            Histogram("disagg_ttft_seconds", "time to first token", buckets=LATENCY_BUCKETS, registry=registry),
            Histogram("disagg_time_per_output_token_seconds", "(e2e - TTFT) / (tokens - 1) per request",
                      buckets=LATENCY_BUCKETS, registry=registry),
            Histogram("disagg_inter_token_latency_seconds", "time between consecutive tokens",
                      buckets=LATENCY_BUCKETS, registry=registry),
            Histogram("disagg_e2e_latency_seconds", "request end-to-end latency", buckets=LATENCY_BUCKETS,
                      registry=registry),
            Counter("disagg_prompt_tokens", "prompt tokens processed", registry=registry),
            Counter("disagg_completion_tokens", "tokens generated", registry=registry),
            Counter("disagg_gateway_prefill_retries", "prefills moved to another prefill worker after its worker "
                    "failed", registry=registry),
            Counter("disagg_gateway_prefills", "prompts sent to be prefilled, by where: a prefill worker or the "
                    "decode worker that admitted the request (--prefill-mode)", ["where"], registry=registry))


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One worker as the gateway sees it."""

    role: str
    address: str
    state: str
    routable: bool


class WorkerStateCollector(Collector):
    """The gateway's workers at scrape time: a worker that left has no series."""

    def __init__(self, rows: Callable[[], Sequence[WorkerRow]], roles: Sequence[str], states: Sequence[str]) -> None:
        self._rows = rows
        self._roles = roles
        self._states = states

    def collect(self) -> Iterator[Metric]:
        rows = self._rows()
        up = GaugeMetricFamily("disagg_gateway_worker_up", "1 while the gateway routes requests to the worker",
                               labels=["role", "address"])
        state = GaugeMetricFamily("disagg_gateway_worker_state", "1 for the worker's current state, 0 for the others",
                                  labels=["role", "address", "state"])
        counts = GaugeMetricFamily("disagg_gateway_workers", "workers the gateway knows, by state",
                                   labels=["role", "state"])
        for row in rows:
            up.add_metric([row.role, row.address], float(row.routable))
            for name in self._states:
                state.add_metric([row.role, row.address, name], float(name == row.state))
        tally = Tally((row.role, row.state) for row in rows)
        for role in self._roles:
            for name in self._states:
                counts.add_metric([role, name], tally[(role, name)])
        yield from (up, state, counts)
