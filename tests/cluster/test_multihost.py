"""The stack across hosts: every service in a network namespace of its own, so every call between
services crosses real interfaces (veth, a bridge, and the emulated prefill-decode links of
tests/cluster/links.py) instead of loopback. Exact output, a slow and lossy prefill-decode link,
and a partition between a prefill worker and the decode worker in the middle of a transfer.

Shared memory: the kvstore's shared-memory transport for workers on one host (DESIGN.md) does not
exist in this project yet, so there is nothing of it to test here; every byte between these hosts
goes over gRPC on TCP.
"""

from __future__ import annotations

import asyncio
import random
import time

from services.bench.workload import synthetic_prompt
from services.client import GatewayClient
from services.common.runtime import ModelRuntime
from services.gateway.text import PromptEncoder
from tests.cluster.links import PARTITION, Conditions
from tests.cluster.multihost import PREFILL_TIMEOUT_SECONDS, PREFILLS, SERVICES, MultiHost
from tests.held import assert_nothing_held, transferring_prefill
from tests.membership_helpers import gateway_stats, wait_state

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def long_prompt(words: int) -> str:
    return synthetic_prompt(random.Random(words), words)


async def complete(address: str, prompt: str, max_tokens: int) -> list[int]:
    async with GatewayClient(address) as client:
        return (await client.complete(prompt, max_tokens=max_tokens, temperature=0, timeout=120)).token_ids


async def test_greedy_output_across_hosts_equals_hugging_face(hosts: MultiHost, tiny_runtime: ModelRuntime,
                                                              tiny_encoder: PromptEncoder) -> None:
    for prompt in PROMPTS:
        expected = tiny_runtime.reference_generate(tiny_encoder.encode_text(prompt), 12)
        for gateway in ("gateway", "gateway_kvstore"):
            assert await complete(hosts.running[gateway], prompt, 12) == expected, (gateway, prompt)
    assert all(link.packets for link in hosts.links.values())  # both prefill workers sent to the decode host
    await assert_nothing_held(hosts.running, SERVICES)


async def test_delayed_lossy_prefill_decode_link_still_gives_exact_output(
        hosts: MultiHost, tiny_runtime: ModelRuntime, tiny_encoder: PromptEncoder) -> None:
    """20 ms each way and 1% of packets lost between the prefill workers and the decode worker."""
    prompt = long_prompt(1000)  # ~1 MB of KV: hundreds of packets, some of them lost
    expected = tiny_runtime.reference_generate(tiny_encoder.encode_text(prompt), 8)
    before = sum(link.dropped for link in hosts.links.values())
    hosts.shape(Conditions(delay_seconds=0.020, loss=0.01))
    try:
        for gateway in ("gateway", "gateway", "gateway_kvstore"):
            assert await complete(hosts.running[gateway], prompt, 8) == expected, gateway
    finally:
        hosts.shape(Conditions())
    assert sum(link.dropped for link in hosts.links.values()) > before  # packets were lost on the way
    await assert_nothing_held(hosts.running, SERVICES)


async def test_partition_mid_transfer_retries_on_the_other_prefill(
        hosts: MultiHost, tiny_runtime: ModelRuntime, tiny_encoder: PromptEncoder) -> None:
    """The link of the prefill worker that is sending KV drops everything; the gateway gives that
    prefill up after --prefill-timeout-seconds and runs it again on the other one."""
    prompt = long_prompt(1500)
    ids = tiny_encoder.encode_text(prompt)
    expected = tiny_runtime.reference_generate(ids, 6)
    hosts.shape(Conditions(rate_bits=2e6))  # ~1.5 MB of KV: a transfer takes ~6 s, so it can be cut
    try:
        async with GatewayClient(hosts.running["gateway"]) as client:
            request = asyncio.ensure_future(client.complete(prompt, max_tokens=6, temperature=0, timeout=120))
            victim = await transferring_prefill(hosts.running, PREFILLS)
            cut = time.monotonic()
            hosts.shape(PARTITION, victim)
            hosts.shape(Conditions(), *(name for name in PREFILLS if name != victim))
            result = await request
        assert result.token_ids == expected
        assert time.monotonic() - cut < PREFILL_TIMEOUT_SECONDS + 30
        failures = {w.address: w.last_failure for w in (await gateway_stats(hosts.running["gateway"])).workers}
        assert "DEADLINE_EXCEEDED" in failures[hosts.running[victim]], failures  # given up after its deadline
        await assert_nothing_held(hosts.running, SERVICES)  # while the partition lasts
    finally:
        hosts.shape(Conditions())
    victim_address = hosts.running[victim]
    await wait_state(hosts.running["gateway"], victim_address, "serving", timeout=30)
    for gateway in ("gateway", "gateway"):  # the healed worker serves again (the two take turns)
        assert await complete(hosts.running[gateway], PROMPTS[0], 6) == \
            tiny_runtime.reference_generate(tiny_encoder.encode_text(PROMPTS[0]), 6)
    await assert_nothing_held(hosts.running, SERVICES)
