"""Prefill faults are the prefill's (tiny model, real processes): a prefill worker that cannot be
reached, is stopped (SIGSTOP: its calls run out their deadline) or is killed is skipped, the prefill
runs on another worker while the decode keeps its admission, and the client gets exactly Hugging
Face's greedy output; the failed worker is routed to again only once it is healthy; retries are
bounded and their failure says what happened. (Faults in the middle of a KV transfer come with
the decode side's superseding transfers.)"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from services.client import GatewayClient, GatewayError, RetryPolicy
from services.common.model_files import default_cache_dir, resolve_model_dir
from services.common.runtime import ModelRuntime
from services.gateway.text import PromptEncoder
from services.stack import ServiceSpec, Stack, free_port
from tests.membership_helpers import (gateway_spec, gateway_stats, requests_total, start, states, wait_serving,
                                      wait_state, worker_spec)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time,",
           "The three primary colors are"]
MAX_TOKENS = 12
PREFILL_TIMEOUT = 3.0


@dataclass
class Faults:
    stack: Stack
    a: ServiceSpec
    b: ServiceSpec
    decode: ServiceSpec
    dead: str
    gateway: str


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    a, b = worker_spec("prefill_a", "prefill"), worker_spec("prefill_b", "prefill")
    decode = worker_spec("decode", "decode")
    dead = f"127.0.0.1:{free_port()}"  # configured, nothing listening
    gateway = gateway_spec("gateway", "--prefill-addresses", f"{a.address},{b.address},{dead}",
                           "--decode-addresses", decode.address, "--prefill-timeout-seconds", str(PREFILL_TIMEOUT),
                           "--failure-backoff-seconds", "0.5", "--failure-backoff-max-seconds", "2")
    stack = Stack([a, b, decode, gateway], log_dir=str(tmp_path_factory.mktemp("prefill-faults")))
    stack.start()
    try:
        stack.wait_healthy(timeout=300)
        yield Faults(stack, a, b, decode, dead, gateway.address)
    finally:
        for process in stack.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
        stack.stop()


@pytest.fixture(scope="module")
def expected() -> dict[str, list[int]]:
    """Hugging Face greedy output of the tiny model, computed in this process."""
    runtime = ModelRuntime("tiny", "float32", "cpu", default_cache_dir())
    encoder = PromptEncoder(resolve_model_dir("tiny", default_cache_dir()))
    return {prompt: runtime.reference_generate(encoder.encode_text(prompt), MAX_TOKENS) for prompt in PROMPTS}


async def _timed_completions(faults: Faults, expected: dict[str, list[int]], prompts: list[str]) -> list[float]:
    """Each prompt's seconds; every output must equal Hugging Face's."""
    seconds = []
    async with GatewayClient(faults.gateway, retry=RetryPolicy(max_retries=0)) as client:
        for prompt in prompts:
            started = time.monotonic()
            completion = await client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0, timeout=60)
            seconds.append(time.monotonic() - started)
            assert completion.token_ids == expected[prompt], prompt
    return seconds


async def test_a_dead_prefill_address_is_never_picked(faults: Faults, expected: dict[str, list[int]]) -> None:
    assert (await states(faults.gateway))[faults.dead] == "unreachable"
    assert max(await _timed_completions(faults, expected, PROMPTS)) < PREFILL_TIMEOUT
    dead = next(w for w in (await gateway_stats(faults.gateway)).workers if w.address == faults.dead)
    assert dead.consecutive_failures == 0 and dead.active_requests == 0


async def test_a_stopped_prefill_is_given_up_on_retried_and_skipped_until_healthy(
        faults: Faults, expected: dict[str, list[int]]) -> None:
    admitted = await requests_total(faults.decode)
    faults.stack.processes["prefill_a"].send_signal(signal.SIGSTOP)
    # idle workers take turns: one of two requests goes to the stopped one first
    seconds = await _timed_completions(faults, expected, PROMPTS[:2])
    assert PREFILL_TIMEOUT <= max(seconds) < PREFILL_TIMEOUT + 2, seconds
    assert await requests_total(faults.decode) == admitted + 2  # the decode kept each admission
    stopped = next(w for w in (await gateway_stats(faults.gateway)).workers if w.address == faults.a.address)
    assert stopped.consecutive_failures >= 1 and "DEADLINE_EXCEEDED" in stopped.last_failure
    assert max(await _timed_completions(faults, expected, PROMPTS[2:])) < PREFILL_TIMEOUT  # skipped
    assert (await states(faults.gateway))[faults.a.address] == "backoff"  # its health checks fail
    faults.stack.processes["prefill_a"].send_signal(signal.SIGCONT)
    await wait_state(faults.gateway, faults.a.address, "serving", 2 + 2 + 2)  # backoff cap + check + slack
    await asyncio.sleep(0.5)
    before = await requests_total(faults.a)
    await _timed_completions(faults, expected, PROMPTS[:2])
    assert await requests_total(faults.a) > before


async def test_prefill_retries_are_bounded_and_say_why(faults: Faults) -> None:
    for name in ("prefill_a", "prefill_b"):
        faults.stack.processes[name].send_signal(signal.SIGSTOP)
    try:
        async with GatewayClient(faults.gateway, retry=RetryPolicy(max_retries=0)) as client:
            started = time.monotonic()
            with pytest.raises(GatewayError) as failed:
                await client.complete("Hello", max_tokens=4, temperature=0, timeout=60)
            assert time.monotonic() - started < 2 * PREFILL_TIMEOUT + 2
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "prefill failed on 2 worker(s)" in failed.value.details()
            assert "DEADLINE_EXCEEDED" in failed.value.details()
            with pytest.raises(GatewayError) as refused:  # both in backoff now: refused at once
                await client.complete("Hello", max_tokens=4, temperature=0, timeout=60)
            assert "no prefill worker is serving" in refused.value.details()
    finally:
        for name in ("prefill_a", "prefill_b"):
            faults.stack.processes[name].send_signal(signal.SIGCONT)
    for spec in (faults.a, faults.b):
        await wait_state(faults.gateway, spec.address, "serving", 6)


async def test_a_killed_prefill_is_skipped_until_it_is_back(faults: Faults, expected: dict[str, list[int]]) -> None:
    faults.stack.processes["prefill_a"].send_signal(signal.SIGKILL)
    assert await wait_state(faults.gateway, faults.a.address, "unreachable", 2) < 1.0
    assert max(await _timed_completions(faults, expected, PROMPTS)) < PREFILL_TIMEOUT
    faults.stack.processes["prefill_a"].wait(10)
    restarted = start(faults.stack, faults.a)
    serving_at = await asyncio.to_thread(wait_serving, faults.a, restarted)
    await wait_state(faults.gateway, faults.a.address, "serving", 5)
    assert time.monotonic() - serving_at < 2.0
    await _timed_completions(faults, expected, PROMPTS[:2])
    assert await requests_total(faults.a) >= 1
