"""An unreachable kvstore or Redis: UNAVAILABLE where the kvstore is required, normal serving over
the direct stream where it is optional (the checkpoint)."""

from __future__ import annotations

import grpc
import pytest

from services.client import GatewayClient, GatewayError
from services.common.pb import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from services.stack import free_port
from tests.conftest import RunningStack, start_stack
from tests.kv_helpers import real_transfer, replace


@pytest.fixture(scope="module")
def redis_down_stack(tmp_path_factory: pytest.TempPathFactory) -> RunningStack:
    """Tiny model; the kvstore's Redis is a port nobody listens on; the prefill checkpoints to it."""
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    running = start_stack(tmp_path_factory.mktemp("redis-down"), "tiny", "redis", dead_redis,
                          extra={"prefill": ("--checkpoint-kv",), "kvstore": ("--redis-url", dead_redis)},
                          extra_gateways={"gateway_kvstore": ("--kv-transfer", "kvstore")},
                          wait_for=("prefill", "decode", "gateway", "gateway_kvstore"))
    yield running
    running.stack.stop()


async def test_kvstore_path_without_redis_is_unavailable(redis_down_stack) -> None:
    async with GatewayClient(redis_down_stack["gateway_kvstore"]) as client:
        with pytest.raises(GatewayError) as caught:
            await client.complete("Hello there", max_tokens=4, temperature=0)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "redis" in caught.value.details().lower() or "kvstore" in caught.value.details().lower()


async def test_kvstore_reports_redis_unavailable(redis_down_stack) -> None:
    async with grpc.aio.insecure_channel(redis_down_stack["kvstore"]) as channel:
        stub = kvstore_pb2_grpc.KvStoreServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Put(kvstore_pb2.PutRequest(namespace="n", key="k", value=b"v"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_direct_path_serves_without_redis(redis_down_stack) -> None:
    async with GatewayClient(redis_down_stack["gateway"]) as client:
        last = await client.complete("Hello there", max_tokens=6, temperature=0, ignore_eos=True)
        ids = last.token_ids
    assert len(ids) == 6 and last.finish_reason == "length"


async def test_kvstore_process_down_is_unavailable(redis_down_stack) -> None:
    redis_down_stack.stack.processes["kvstore"].kill()
    redis_down_stack.stack.processes["kvstore"].wait()
    async with GatewayClient(redis_down_stack["gateway_kvstore"]) as client:
        with pytest.raises(GatewayError) as caught:
            await client.complete("Hello there", max_tokens=4, temperature=0)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    async with GatewayClient(redis_down_stack["gateway"]) as client:
        ids = (await client.complete("Hello there", max_tokens=6, temperature=0, ignore_eos=True)).token_ids
    assert len(ids) == 6


async def test_kv_announced_in_an_empty_kvstore_is_not_found(memory_stack) -> None:
    """A transfer that announces its chunks in the kvstore, which does not have them."""
    from services.common.pb import decode_pb2, decode_pb2_grpc
    from tests.kv_helpers import send

    async with grpc.aio.insecure_channel(memory_stack["decode"]) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        model = await stub.GetModelInfo(common_pb2.ModelInfoRequest())
        call = stub.Generate(decode_pb2.DecodeRequest(
            request_id="never-prefilled", prompt_token_ids=[1, 2, 3],
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=2), kv_source=decode_pb2.KV_SOURCE_KVSTORE))
        assert (await call.read()).HasField("accepted")
        layout, *_, end = real_transfer(model, "never-prefilled", 3, 3, model.num_layers)
        with pytest.raises(grpc.aio.AioRpcError) as announced:
            await send(stub, [replace(layout, chunks_in_kvstore=True), end])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    assert announced.value.code() == caught.value.code() == grpc.StatusCode.NOT_FOUND
