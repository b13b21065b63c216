"""A client that cancels mid-stream leaves no request and no KV held anywhere."""

from __future__ import annotations

import asyncio

import grpc

from services.common.pb import common_pb2, decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc, prefill_pb2_grpc


async def _held(stack) -> dict[str, tuple[int, int]]:
    async with grpc.aio.insecure_channel(stack["decode"]) as d, grpc.aio.insecure_channel(stack["prefill"]) as p, \
            grpc.aio.insecure_channel(stack["gateway"]) as g:
        decode = await decode_pb2_grpc.DecodeServiceStub(d).Stats(common_pb2.StatsRequest())
        prefill = await prefill_pb2_grpc.PrefillServiceStub(p).Stats(common_pb2.StatsRequest())
        gateway = await gateway_pb2_grpc.GatewayServiceStub(g).Stats(common_pb2.StatsRequest())
    return {"decode": (decode.active_requests, decode.kv_bytes_held),
            "prefill": (prefill.active_requests, prefill.kv_bytes_held),
            "gateway": (gateway.active_requests, sum(w.active_requests for w in gateway.workers))}


async def _wait_until_idle(stack) -> dict[str, tuple[int, int]]:
    held = await _held(stack)
    for _ in range(100):
        if all(value == (0, 0) for value in held.values()):
            break
        await asyncio.sleep(0.1)
        held = await _held(stack)
    return held


async def test_cancel_mid_stream_frees_everything(memory_stack) -> None:
    async with grpc.aio.insecure_channel(memory_stack["gateway"]) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        call = stub.Generate(gateway_pb2.GenerateRequest(
            prompt="Tell me a long story about a dragon.",
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)))
        for _ in range(5):
            await call.read()
        during = await _held(memory_stack)
        call.cancel()
    assert during["decode"][0] == 1 and during["decode"][1] > 0
    assert await _wait_until_idle(memory_stack) == {"decode": (0, 0), "prefill": (0, 0), "gateway": (0, 0)}


async def test_cancel_during_prefill_frees_everything(memory_stack) -> None:
    async with grpc.aio.insecure_channel(memory_stack["gateway"]) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        call = stub.Generate(gateway_pb2.GenerateRequest(
            prompt="word " * 1500, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=4)))
        await asyncio.sleep(0.3)  # admitted, prefill running
        call.cancel()
    assert await _wait_until_idle(memory_stack) == {"decode": (0, 0), "prefill": (0, 0), "gateway": (0, 0)}
