"""One trace per request across all four services (exported over OTLP to a real receiver built
from the opentelemetry-proto service definitions), Prometheus /metrics on every service."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import defaultdict

import pytest
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client.parser import text_string_to_metric_families

from services.client import GatewayClient, GatewayError
from services.stack import free_port
from tests.conftest import RunningStack, start_stack
from tests.otlp_receiver import SpanSink


@pytest.fixture(scope="module")
def traced_stack(tmp_path_factory: pytest.TempPathFactory, receiver: SpanSink) -> RunningStack:
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
           "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    running = start_stack(tmp_path_factory.mktemp("traced"), "tiny", extra={"prefill": ("--checkpoint-kv",)},
                          env=env)
    yield running
    running.stack.stop()


async def _wait_for(condition, timeout: float = 15.0) -> bool:
    """Whether `condition` held within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def test_one_trace_spans_all_four_services(traced_stack: RunningStack, receiver: SpanSink) -> None:
    async with GatewayClient(traced_stack["gateway"]) as client:
        await client.complete("Hello world", max_tokens=5, temperature=0, request_id="traced-1")
    assert await _wait_for(lambda: receiver.trace_of("gateway", "gateway.Generate", "traced-1") is not None)
    trace_id = receiver.trace_of("gateway", "gateway.Generate", "traced-1")
    services = lambda: {owner for owner, _ in receiver.in_trace(trace_id)}  # noqa: E731
    assert await _wait_for(lambda: services() >= {"gateway", "prefill", "decode", "kvstore"})
    expected = {"gateway.Generate", "gateway.tokenize", "gateway.route", "prefill.Prefill", "prefill.queue_wait",
                "prefill.forward", "prefill.kv_send", "decode.Generate", "decode.TransferKv", "kv.handoff",
                "decode.generation", "kvstore.Put"}
    # Each process exports its spans in batches, every 100 ms: a span that ended after the reply (the
    # decode's Generate) may come a batch after the others.
    await _wait_for(lambda: expected <= {s.name for _, s in receiver.in_trace(trace_id)})  # asserted below
    spans = receiver.in_trace(trace_id)
    names = {span.name for _, span in spans}
    assert expected <= names, f"missing spans: {sorted(expected - names)}"
    by_id = {span.span_id: span for _, span in spans}
    roots = [span for span in by_id.values() if not span.parent_span_id]
    assert [root.name for root in roots] == ["gateway.Generate"]
    handoff = next(span for _, span in spans if span.name == "kv.handoff")
    assert handoff.parent_span_id in by_id  # parented inside the request's trace
    attributes = {a.key: a.value for a in handoff.attributes}
    assert attributes["kv.handoff_ms"].double_value >= 0 and attributes["kv.bytes"].int_value > 0
    send = next(span for _, span in spans if span.name == "prefill.kv_send")
    send_attributes = {a.key for a in send.attributes}
    assert {"kv.bytes", "kv.chunks", "kv.chunk_tokens", "kv.encoding", "kv.throughput_bytes_per_second"} <= \
        send_attributes


async def test_failed_request_spans_carry_error_status(traced_stack: RunningStack, receiver: SpanSink) -> None:
    async with GatewayClient(traced_stack["gateway"]) as client:
        with pytest.raises(GatewayError):
            await client.complete("Hello", max_tokens=5, top_p=2.0, request_id="traced-bad")
    assert await _wait_for(lambda: receiver.trace_of("gateway", "gateway.Generate", "traced-bad") is not None)
    spans = receiver.in_trace(receiver.trace_of("gateway", "gateway.Generate", "traced-bad"))
    generate = next(span for _, span in spans if span.name == "gateway.Generate")
    assert generate.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert "INVALID_ARGUMENT" in generate.status.message


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f"|{k}={v}" for k, v in sorted(sample.labels.items())
                                        if k in ("method", "code", "where"))
            values[key] += sample.value
    return values


async def test_metrics_parse_and_move(memory_stack) -> None:
    ports = memory_stack.metrics_ports
    before = {name: _scrape(ports[name]) for name in ("gateway", "prefill", "decode", "kvstore")}
    async with GatewayClient(memory_stack["gateway"]) as client:
        await client.complete("The capital of France is", max_tokens=4, temperature=0, ignore_eos=True)
    after = {name: _scrape(ports[name]) for name in ("gateway", "prefill", "decode", "kvstore")}
    moved = lambda service, key: after[service][key] - before[service][key]  # noqa: E731
    assert moved("gateway", "disagg_ttft_seconds_count") == 1
    assert moved("gateway", "disagg_e2e_latency_seconds_count") == 1
    assert moved("gateway", "disagg_inter_token_latency_seconds_count") == 3
    assert moved("gateway", "disagg_completion_tokens_total") == 4
    assert moved("gateway", "disagg_rpc_requests_total|code=OK|method=Generate") == 1
    assert moved("prefill", "disagg_prefill_forward_seconds_count") == 1
    assert moved("prefill", "disagg_kv_transfer_bytes_total") > 0
    assert moved("decode", "disagg_kv_handoff_seconds_count") == 1
    assert moved("decode", "disagg_kv_received_bytes_total") > 0
    assert moved("kvstore", "disagg_rpc_requests_total|code=OK|method=Put") > 0
    for service, gauge in (("prefill", "disagg_model_loop_busy_fraction"), ("decode", "disagg_kv_pool_pressure"),
                           ("decode", "disagg_decode_running_batch_size"), ("decode", "disagg_model_loop_queue_depth")):
        assert gauge in after[service]
    assert 0 < after["decode"]["disagg_model_loop_busy_fraction"] <= 1


async def test_failed_requests_are_counted_by_code(memory_stack) -> None:
    port = memory_stack.metrics_ports["gateway"]
    before = _scrape(port)["disagg_rpc_requests_total|code=INVALID_ARGUMENT|method=Generate"]
    async with GatewayClient(memory_stack["gateway"]) as client:
        with pytest.raises(GatewayError):
            await client.complete("", max_tokens=4)
    assert _scrape(port)["disagg_rpc_requests_total|code=INVALID_ARGUMENT|method=Generate"] == before + 1


def test_unused_port_helper_is_free() -> None:
    assert free_port() > 0
