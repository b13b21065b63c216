"""Cache-aware routing: the gateway sends a prompt to the prefill worker that already computed most
of its blocks, and to the decode worker that holds them, weighed against load; with routing off, it is
the least loaded (rotating) worker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import pytest

from services.client import GatewayClient
from services.common.pb import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from services.gateway.prefix_route import LOAD_TOKENS, PrefixAffinity
from services.gateway.routing import Worker
from tests.conftest import RunningStack, add_service


def test_the_worker_holding_the_prefix_wins_unless_it_is_much_busier() -> None:
    affinity = PrefixAffinity(block_size=16)
    keys = affinity.keys(list(range(500)), "")  # 31 blocks
    affinity.record("b:1", keys[:20])
    idle_a, idle_b = Worker("a:1", "prefill"), Worker("b:1", "prefill")
    assert affinity.held("b:1", keys) == 20 and affinity.choose([idle_a, idle_b], keys) is idle_b
    saved = 20 * 16  # tokens b need not compute
    busy_b, very_busy_b = Worker("b:1", "prefill", active=1), Worker("b:1", "prefill", active=2)
    assert LOAD_TOKENS < saved < 2 * LOAD_TOKENS
    assert affinity.choose([idle_a, busy_b], keys) is busy_b  # one request's wait costs less than the prefix
    assert affinity.choose([idle_a, very_busy_b], keys) is idle_a  # two cost more
    assert affinity.choose([idle_a, idle_b], affinity.keys(list(range(600, 700)), "")) is idle_a  # no record: rank
    assert affinity.held("b:1", affinity.keys(list(range(500)), "tenant")) == 0  # salts apart


def test_the_record_forgets_the_least_recently_used_chain_ends_first() -> None:
    affinity = PrefixAffinity(block_size=16, capacity=4)
    first, second = affinity.keys(list(range(81)), ""), affinity.keys(list(range(1000, 1033)), "")
    affinity.record("a:1", first)  # 5 blocks: the last one is already forgotten
    affinity.record("a:1", second)  # 2 more: two more of `first`'s ends go
    assert affinity.held("a:1", first) == 2 and affinity.held("a:1", second) == 2


async def _hits(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        return (await prefill_pb2_grpc.PrefillServiceStub(channel).Stats(common_pb2.StatsRequest(),
                                                                         timeout=10)).prefix_hit_tokens_total


async def _found_on_repeats(gateway: str, workers: list[str], prompts: list[str],
                            hits: Callable[[str], Awaitable[int]]) -> int:
    """Prompt tokens the workers found cached while `gateway` served each prompt twice in a row."""
    before = sum([await hits(worker) for worker in workers])
    async with GatewayClient(gateway) as client:
        for prompt in (prompts[0], prompts[0], prompts[1], prompts[1]):
            await client.complete(prompt, max_tokens=2, temperature=0)
    return sum([await hits(worker) for worker in workers]) - before


async def _decode_hits(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        return (await decode_pb2_grpc.DecodeServiceStub(channel).Stats(common_pb2.StatsRequest(),
                                                                       timeout=10)).prefix_hit_tokens


ROLES = {  # role: its cache's hit counter, and two prompt topics (one per gateway) and places
    "prefill": (_hits, ("lighthouses", "glaciers"), ("Oslo", "Lima")),
    "decode": (_decode_hits, ("harbours", "volcanoes"), ("Porto", "Riga")),
}


@pytest.mark.parametrize("role", ROLES)
async def test_a_repeated_prompt_goes_back_to_the_worker_that_holds_it(memory_stack: RunningStack, encoder,
                                                                       role: str) -> None:
    """Two idle workers of the role, and prompts sent twice in a row: with routing both repeats
    find every block (computed on the prefill, held on the decode); with routing off the rotation
    sends each repeat to the other worker, which holds none of them."""
    hits, topics, places = ROLES[role]
    workers = [add_service(memory_stack, f"{role}_route{i}", role) for i in (1, 2)]
    flag = f"--{role}-addresses"
    routed = add_service(memory_stack, f"gateway_{role}_routed", "gateway", flag, ",".join(workers))
    unrouted = add_service(memory_stack, f"gateway_{role}_unrouted", "gateway", flag, ",".join(workers),
                           "--prefix-routing", "off")
    for gateway, topic, repeats_hit in ((routed, topics[0], True), (unrouted, topics[1], False)):
        prompts = [f"Write a short report about {topic} and {place}, with three facts, two dates and one "
                   "quotation from a local expert, in the style of a regional newspaper." for place in places]
        found = await _found_on_repeats(gateway, workers, prompts, hits)
        reusable = sum((len(encoder.encode_text(prompt)) - 1) // 16 * 16 for prompt in prompts)
        assert found == (reusable if repeats_hit else 0), (gateway, found, reusable)
