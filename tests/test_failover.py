"""Failover: the decode worker serving a request is killed (SIGKILL) mid-stream; the gateway
resumes the request on the other decode worker and the client sees one uninterrupted stream equal
to Hugging Face `generate`."""

from __future__ import annotations

import math
import re
import signal

import pytest

from services.client import GatewayClient, Guided
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


REGEX = " there lived( [a-z]+){12,30}[.]"


async def test_a_failover_keeps_the_grammar_and_the_logprobs(two_decode_stack: RunningStack) -> None:
    """The new decode replays the completion so far into the request's grammar; every token still
    has its log-probability (the one sampled after the failover comes from the new prefill)."""
    running = two_decode_stack
    alive = [name for name in ("decode", "decode2") if running.stack.processes[name].poll() is None]
    running.addresses["decode3"] = add_service(running, "decode3", "decode")
    decodes = [*alive, "decode3"]
    add_service(running, "gateway3", "gateway", "--decode-addresses", ",".join(running[name] for name in decodes))
    options = {"max_tokens": 40, "temperature": 0, "logprobs": 2, "guided": Guided(regex=REGEX)}
    async with GatewayClient(running["gateway3"]) as client:
        whole = await client.complete(PROMPT, **options)
        tokens, logprobs, text = [], [], []
        async for chunk in client.generate(PROMPT, **options):
            tokens += chunk.token_ids
            logprobs += chunk.logprobs
            text.append(chunk.text)
            if len(tokens) == 8:
                victim = await busy_decode(running, "gateway3", decodes)
                running.stack.processes[victim].send_signal(signal.SIGKILL)
    assert running.stack.processes[victim].wait(10) == -signal.SIGKILL
    assert tokens == whole.token_ids and len(tokens) > 8
    assert "".join(text) == whole.text and whole.finish_reason == "stop" and re.fullmatch(REGEX, whole.text)
    assert [entry.token_id for entry in logprobs] == tokens
    for resumed, alone in zip(logprobs, whole.logprobs, strict=True):
        assert math.isclose(resumed.logprob, alone.logprob, abs_tol=1e-4)


async def test_each_choice_fails_over_on_its_own_and_continues_with_its_seed(two_decode_stack: RunningStack) -> None:
    """Three sampled choices share one decode worker until it is killed; each unfinished choice then
    resumes alone elsewhere (prompt + its tokens, its own seed) and ends exactly as without a kill."""
    running = two_decode_stack
    alive = [name for name in ("decode", "decode2", "decode3") if name in running.stack.processes
             and running.stack.processes[name].poll() is None]
    running.addresses["decode4"] = add_service(running, "decode4", "decode")
    decodes = [*alive, "decode4"]
    add_service(running, "gateway4", "gateway", "--decode-addresses", ",".join(running[name] for name in decodes))
    options = {"max_tokens": 24, "temperature": 0.9, "seed": 5, "ignore_eos": True, "n": 3}
    async with GatewayClient(running["gateway4"]) as client:
        whole = await client.choices(PROMPT, **options)
        tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
        finishes = []
        async for chunk in client.generate(PROMPT, **options):
            tokens[chunk.choice] += chunk.token_ids
            if chunk.finish_reason:
                finishes.append(chunk.choice)
            if sum(map(len, tokens.values())) == 15:
                victim = await busy_decode(running, "gateway4", decodes)
                running.stack.processes[victim].send_signal(signal.SIGKILL)
    assert running.stack.processes[victim].wait(10) == -signal.SIGKILL
    assert sorted(finishes) == [0, 1, 2]
    assert [tokens[index] for index in range(3)] == [choice.token_ids for choice in whole]
