"""Failover: the decode worker serving a request is killed (SIGKILL) mid-stream; the gateway
resumes the request on the other decode worker and the client sees one uninterrupted stream equal
to Hugging Face `generate`."""

from __future__ import annotations

import signal

import grpc
import pytest

from services.client import GatewayClient
from services.common.pb import common_pb2, gateway_pb2_grpc
from services.stack import ServiceSpec, free_port
from tests.conftest import RunningStack, start_stack

PROMPT = "Once upon a time, in a small village,"


@pytest.fixture(scope="module")
def two_decode_stack(tmp_path_factory: pytest.TempPathFactory) -> RunningStack:
    running = start_stack(tmp_path_factory.mktemp("failover"), "default")
    decode = next(spec for spec in running.stack.specs if spec.name == "decode")
    port = free_port()
    second = ServiceSpec("decode2", "decode", port, (*decode.args, "--port", str(port), "--metrics-port", "0"))
    running.stack.specs.append(second)
    running.stack.start_one(second)
    gateway = next(spec for spec in running.stack.specs if spec.name == "gateway")
    gateway_port = free_port()
    both = ServiceSpec("gateway2", "gateway", gateway_port,
                       (*gateway.args, "--port", str(gateway_port), "--http-port", "0", "--metrics-port", "0",
                        "--decode-addresses", f"{running['decode']},{second.address}"))
    running.stack.specs.append(both)
    running.stack.start_one(both)
    running.stack.wait_healthy(timeout=300)
    running.addresses |= {"decode2": second.address, "gateway2": both.address}
    yield running
    running.stack.stop()


async def _serving_decode(stack: RunningStack) -> str:
    async with grpc.aio.insecure_channel(stack["gateway2"]) as channel:
        stats = await gateway_pb2_grpc.GatewayServiceStub(channel).Stats(common_pb2.StatsRequest())
    busy = [w.address for w in stats.workers if w.role == "decode" and w.active_requests]
    assert len(busy) == 1, stats
    return "decode" if busy[0] == stack["decode"] else "decode2"


async def test_killed_decode_worker_is_replaced_mid_stream(two_decode_stack: RunningStack, runtime,
                                                           encoder) -> None:
    expected = runtime.reference_generate(encoder.encode_text(PROMPT), 48)
    tokens: list[int] = []
    text = []
    async with GatewayClient(two_decode_stack["gateway2"]) as client:
        async for chunk in client.generate(PROMPT, max_tokens=48, temperature=0):
            tokens += chunk.token_ids
            text.append(chunk.text)
            if len(tokens) == 10:
                victim = await _serving_decode(two_decode_stack)
                two_decode_stack.stack.processes[victim].send_signal(signal.SIGKILL)
            last = chunk
    assert tokens == expected
    assert "".join(text) == encoder.tokenizer.decode(expected, skip_special_tokens=True)
    assert last.usage.completion_tokens == len(expected)
    assert two_decode_stack.stack.processes[victim].wait(10) == -signal.SIGKILL
