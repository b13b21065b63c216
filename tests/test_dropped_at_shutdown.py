"""A call a server dropped as it shut down is retried, never failed: grpc core ends a call that
reached a server but that no handler had taken yet, when the server stops, with CANCELLED
"CANCELLED" (grpc/grpc#41785). During a rolling restart that is a call sent in the instant between a
worker's drain and its exit; no handler ran, so nothing was done and it is safe to repeat. It
reads as UNAVAILABLE (`services.common.errors.call_status`) wherever a caller decides to retry:
the gateway's decode admission, prefill and model info, the kvstore client, and the client SDK.

The first test pins grpc core's behaviour on a real server. The others put, in front of the real
services, a real gRPC server on loopback that ends every call the same way (a dropping worker,
SERVING in its health), and require that every request still succeeds with Hugging Face's output.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.client import GatewayClient
from services.common.errors import call_status, status_of
from services.common.kvstore_client import KvStoreClient
from services.common.runtime import ModelRuntime
from services.common.channel_factory import ChannelFactory
from services.gateway.text import PromptEncoder
from tests.conftest import RunningStack, add_service

PROMPT = "The capital of France is"  # under one routing block: workers are chosen by load and rotation
TRIES = 12  # requests until the dropping worker has been routed to (it is then in backoff)


class DroppingServer:
    """A gRPC server, SERVING in its health, that ends every call as grpc core ends one it dropped
    at shutdown; `calls` counts them by method."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers([_Dropper(self.calls)])
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    async def start(self) -> None:
        await self._server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        await self._server.stop(0)


class _Dropper(grpc.GenericRpcHandler):
    def __init__(self, calls: Counter[str]) -> None:
        self._calls = calls

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method  # type: ignore[attr-defined]
        if method.startswith("/grpc.health"):
            return None

        async def drop(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self._calls[method.rsplit("/", 1)[-1]] += 1
            await context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
            return b""
        return grpc.unary_unary_rpc_method_handler(drop)


@pytest.fixture
async def dropping() -> AsyncIterator[DroppingServer]:
    server = DroppingServer()
    await server.start()
    yield server
    await server.stop()


def test_grpc_core_ends_a_call_no_handler_took_at_shutdown_with_cancelled_which_reads_as_unavailable() -> None:
    async def serve_then_stop(port_ready: threading.Event, port: list[int]) -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        port_ready.set()
        time.sleep(0.5)  # the loop is blocked: the calls reach grpc core and no handler takes them
        await server.stop(1.0)

    errors: list[grpc.RpcError] = []

    def call_three(port_ready: threading.Event, port: list[int]) -> None:
        port_ready.wait(10)
        with grpc.insecure_channel(f"127.0.0.1:{port[0]}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            futures = [stub.Check.future(health_pb2.HealthCheckRequest(), timeout=10) for _ in range(3)]
            for future in futures:
                if future.exception() is not None:
                    errors.append(future.exception())  # type: ignore[arg-type]

    ready, port = threading.Event(), []
    client = threading.Thread(target=call_three, args=(ready, port))
    client.start()
    asyncio.run(serve_then_stop(ready, port))
    client.join(15)
    dropped = [e for e in errors if e.code() == grpc.StatusCode.CANCELLED]  # type: ignore[attr-defined]
    assert dropped, [(e.code(), e.details()) for e in errors]  # type: ignore[attr-defined]
    for error in dropped:
        assert call_status(error)[0] == grpc.StatusCode.UNAVAILABLE
        aio_error = grpc.aio.AioRpcError(error.code(), grpc.aio.Metadata(), grpc.aio.Metadata(),  # type: ignore[attr-defined]
                                         error.details())  # type: ignore[attr-defined]
        assert status_of(aio_error)[0] == grpc.StatusCode.UNAVAILABLE  # what a servicer edge passes on


async def test_model_info_a_decode_admission_and_a_prefill_dropped_at_shutdown_go_to_other_workers(
        memory_stack: RunningStack, dropping: DroppingServer, runtime: ModelRuntime, encoder: PromptEncoder) -> None:
    expected = runtime.reference_generate(encoder.encode_text(PROMPT), 3)
    gateway = add_service(memory_stack, f"gateway_dropping_{dropping.address.rsplit(':', 1)[1]}", "gateway",
                          "--prefill-addresses", f"{dropping.address},{memory_stack['prefill']}",
                          "--decode-addresses", f"{dropping.address},{memory_stack['decode']}")
    async with GatewayClient(gateway) as client:
        for _ in range(4):  # ties rotate: the dropping decode is asked first every other time
            assert (await client.model_info(timeout=30)).fingerprint
        for _ in range(TRIES):
            completion = await client.complete(PROMPT, max_tokens=3, temperature=0, timeout=60)
            assert completion.token_ids == expected
            if dropping.calls["Generate"] and dropping.calls["Prefill"]:
                break
    assert dropping.calls["GetModelInfo"] and dropping.calls["Generate"] and dropping.calls["Prefill"], dropping.calls


async def test_the_client_retries_a_call_a_gateway_dropped_at_shutdown(
        memory_stack: RunningStack, dropping: DroppingServer, runtime: ModelRuntime, encoder: PromptEncoder) -> None:
    expected = runtime.reference_generate(encoder.encode_text(PROMPT), 3)
    async with GatewayClient(f"{dropping.address},{memory_stack['gateway']}") as client:
        for _ in range(TRIES):
            completion = await client.complete(PROMPT, max_tokens=3, temperature=0, timeout=60)
            assert completion.token_ids == expected
            if dropping.calls["Generate"]:
                break
    assert dropping.calls["Generate"]


async def test_a_kvstore_call_dropped_at_shutdown_is_retried_on_the_other_kvstore(
        memory_stack: RunningStack, dropping: DroppingServer) -> None:
    store = KvStoreClient(f"{dropping.address},{memory_stack['kvstore']}", "dropped-at-shutdown", 10,
                          ChannelFactory(), shared_memory_reads=False)
    try:
        for index in range(TRIES):
            await store.put(f"key-{index}", b"value %d" % index, ttl_seconds=60)
            assert await store.get(f"key-{index}") == b"value %d" % index
            if dropping.calls["Put"] and dropping.calls["Get"]:
                break
        assert dropping.calls["Put"] and dropping.calls["Get"], dropping.calls
    finally:
        await store.delete_prefix("key-")
        await store.close()
