"""The Python SDK: async and sync streaming with typed results, deadlines, retries on a transient
UNAVAILABLE, and API keys over gRPC metadata."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest

from services.client import Completion, GatewayClient, GatewayError, GenerateChunk, RetryPolicy, SyncGatewayClient
from services.stack import ServiceSpec, Stack, free_port
from tests.conftest import API_KEY, RunningStack

PROMPT = "The capital of France is"


async def test_async_streaming_yields_typed_chunks(memory_stack: RunningStack, runtime, encoder) -> None:
    expected = runtime.reference_generate(encoder.encode_text(PROMPT), 12)
    async with GatewayClient(memory_stack["gateway"], timeout_seconds=60) as client:
        chunks = [chunk async for chunk in client.generate(PROMPT, max_tokens=12, temperature=0)]
    assert all(isinstance(chunk, GenerateChunk) for chunk in chunks)
    assert [t for c in chunks for t in c.token_ids] == expected
    assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens == len(expected)
    assert len({chunk.request_id for chunk in chunks}) == 1


def test_sync_streaming_and_complete(memory_stack: RunningStack, runtime, encoder) -> None:
    expected = runtime.reference_generate(encoder.encode_text(PROMPT), 12)
    with SyncGatewayClient(memory_stack["gateway"]) as client:
        streamed = [t for chunk in client.generate(PROMPT, max_tokens=12, temperature=0) for t in chunk.token_ids]
        whole = client.complete(PROMPT, max_tokens=12, temperature=0)
    assert streamed == expected
    assert isinstance(whole, Completion) and whole.token_ids == expected
    assert whole.text == encoder.tokenizer.decode(expected, skip_special_tokens=True)


async def test_expired_deadline_is_deadline_exceeded(memory_stack: RunningStack) -> None:
    async with GatewayClient(memory_stack["gateway"]) as client:
        with pytest.raises(GatewayError) as caught:
            await client.complete(PROMPT, max_tokens=300, temperature=0, ignore_eos=True, timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with SyncGatewayClient(memory_stack["gateway"], timeout_seconds=0.3) as client:
        with pytest.raises(GatewayError) as caught:
            client.complete(PROMPT, max_tokens=300, temperature=0, ignore_eos=True)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_api_key_travels_in_metadata(memory_stack: RunningStack) -> None:
    with SyncGatewayClient(memory_stack["gateway_keyed"]) as anonymous:
        with pytest.raises(GatewayError) as caught:
            anonymous.complete(PROMPT, max_tokens=2)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with SyncGatewayClient(memory_stack["gateway_keyed"], api_key="wrong") as wrong:
        with pytest.raises(GatewayError) as caught:
            wrong.complete(PROMPT, max_tokens=2)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with SyncGatewayClient(memory_stack["gateway_keyed"], api_key=API_KEY) as keyed:
        assert keyed.complete(PROMPT, max_tokens=2, temperature=0).usage.completion_tokens == 2


async def test_retry_succeeds_after_a_transient_unavailable(memory_stack: RunningStack, tmp_path: Path) -> None:
    """The client starts before the gateway exists; its retries succeed once the gateway is up."""
    port = free_port()
    gateway = next(spec for spec in memory_stack.stack.specs if spec.name == "gateway")
    late = Stack([ServiceSpec("late-gateway", "gateway", port, (*gateway.args, "--port", str(port),
                                                                 "--http-port", "0", "--metrics-port", "0"))],
                 log_dir=str(tmp_path))
    started = threading.Timer(1.0, late.start)
    started.start()
    try:
        retry = RetryPolicy(max_retries=60, initial_backoff_seconds=0.2, max_backoff_seconds=0.5)
        async with GatewayClient(f"127.0.0.1:{port}", retry=retry) as client:
            began = time.monotonic()
            result = await client.complete(PROMPT, max_tokens=3, temperature=0)
        assert result.usage.completion_tokens == 3 and time.monotonic() - began > 1.0
    finally:
        started.join()
        late.stop()


async def test_no_retry_without_policy_fails_fast() -> None:
    async with GatewayClient(f"127.0.0.1:{free_port()}", retry=RetryPolicy(max_retries=0)) as client:
        with pytest.raises(GatewayError) as caught:
            await asyncio.wait_for(client.complete(PROMPT, max_tokens=2), 10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
