"""Failover: the decode worker serving a request is killed (SIGKILL) mid-stream; the gateway
resumes the request on the other decode worker and the client sees one uninterrupted stream equal
to Hugging Face `generate`."""

from __future__ import annotations

import signal

import pytest

from services.client import GatewayClient
from tests.conftest import RunningStack, add_service, busy_decode, start_stack

PROMPT = "Once upon a time, in a small village,"


@pytest.fixture(scope="module")
def two_decode_stack(tmp_path_factory: pytest.TempPathFactory) -> RunningStack:
    running = start_stack(tmp_path_factory.mktemp("failover"), "default")
    second = add_service(running, "decode2", "decode")
    add_service(running, "gateway2", "gateway", "--decode-addresses", f"{running['decode']},{second}")
    yield running
    running.stack.stop()


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
                victim = await busy_decode(two_decode_stack, "gateway2", ("decode", "decode2"))
                two_decode_stack.stack.processes[victim].send_signal(signal.SIGKILL)
            last = chunk
    assert tokens == expected
    assert "".join(text) == encoder.tokenizer.decode(expected, skip_special_tokens=True)
    assert last.usage.completion_tokens == len(expected)
    assert two_decode_stack.stack.processes[victim].wait(10) == -signal.SIGKILL
