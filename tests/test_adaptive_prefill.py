"""`--prefill-mode adaptive` (services/gateway/placement.py): a short prompt goes to the shorter
queue, the prefill workers' or the decode workers' own; through the services, a burst of short
prompts is prefilled on both sides and every output is Hugging Face's."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.client import GatewayClient
from services.common.backoff import Backoff
from services.common.config import parse_settings
from services.gateway.placement import PrefillPlacement
from services.gateway.routing import Worker, WorkerPool, WorkerState
from services.gateway.settings import GatewaySettings
from tests.conftest import PROMPTS, RunningStack


class Unwatched:
    """Health is set by the test itself: the placement reads the pools, never the network."""

    def watch(self, pool: WorkerPool, worker: Worker) -> None:
        pass

    def forget(self, worker: Worker) -> None:
        pass

    def recover(self, pool: WorkerPool, worker: Worker) -> None:
        pass


def pool(role: str, *addresses: str) -> WorkerPool:
    workers = WorkerPool(role, Backoff(0.1, 1.0), Unwatched())
    workers.update(addresses)
    for worker in workers.workers:
        workers.set_health(worker, WorkerState.SERVING)
    return workers


def test_adaptive_mode_sends_a_burst_of_short_prompts_to_both_queues_in_turn() -> None:
    prefill, decode = pool("prefill", "p:1"), pool("decode", "d:1")
    placement = PrefillPlacement("adaptive", 256, prefill, decode)
    places = []
    with WorkerPool.lease(prefill.workers[0]):  # the one the prefill worker holds already
        places.append(placement.local(100))
        with placement.local_prefill() as first_token:
            places.append(placement.local(100))  # one each: a tie goes to the prefill worker
            with WorkerPool.lease(prefill.workers[0]):
                places.append(placement.local(100))
                first_token()  # the decode's prompt is prefilled: its queue is empty again
                places.append(placement.local(100))
            assert placement.local_in_flight == 0
    assert places == [True, False, True, True]
    assert placement.local_in_flight == 0


def test_adaptive_mode_keeps_long_prompts_and_an_idle_system_on_the_prefill_workers() -> None:
    prefill, decode = pool("prefill", "p:1"), pool("decode", "d:1")
    placement = PrefillPlacement("adaptive", 256, prefill, decode)
    assert not placement.local(10)  # nothing queued anywhere
    with WorkerPool.lease(prefill.workers[0]), WorkerPool.lease(prefill.workers[0]):
        assert not placement.local(256)  # not shorter than the threshold
        assert placement.local(255)


def test_adaptive_mode_counts_each_serving_decode_worker_and_only_serving_prefill_workers() -> None:
    prefill, decode = pool("prefill", "p:1", "p:2"), pool("decode", "d:1", "d:2")
    placement = PrefillPlacement("adaptive", 256, prefill, decode)
    busy, idle = prefill.workers
    with WorkerPool.lease(busy), placement.local_prefill():
        assert not placement.local(10)  # p:2 has no prompt queued
        prefill.set_health(idle, WorkerState.NOT_SERVING)
        assert placement.local(10)  # 1 local prompt over 2 decode workers < 1 on the prefill worker
        decode.set_health(decode.workers[1], WorkerState.NOT_SERVING)
        assert not placement.local(10)  # 1 over 1: a tie
        prefill.set_health(busy, WorkerState.UNREACHABLE)
        assert placement.local(10)  # no prefill worker serves: the decode worker rather than a failure
        assert not placement.local(300)


@pytest.mark.parametrize(("mode", "places"), [("disaggregated", [False, False]), ("unified", [True, True]),
                                              ("conditional", [True, False])])
def test_the_other_modes_ignore_load(mode: str, places: list[bool]) -> None:
    placement = PrefillPlacement(mode, 256, pool("prefill", "p:1"), pool("decode", "d:1"))
    assert [placement.local(tokens) for tokens in (10, 300)] == places


def test_an_unknown_prefill_mode_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="prefill_mode must be one of"):
        parse_settings(GatewaySettings, "gateway", "", ["--prefill-mode", "balanced"], {})
    assert parse_settings(GatewaySettings, "gateway", "", [], {"PREFILL_MODE": "adaptive"}).prefill_mode == "adaptive"


def _prefills(stack: RunningStack, gateway: str) -> dict[str, float]:
    """The gateway's `disagg_gateway_prefills_total`, by where."""
    port = stack.metrics_ports[gateway]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    sent = {"prefill_worker": 0.0, "decode_worker": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "disagg_gateway_prefills_total":
                sent[sample.labels["where"]] += sample.value
    return sent


@pytest.fixture(scope="module")
def references(runtime, encoder) -> dict[tuple[str, int], list[int]]:
    return {(prompt, 6): runtime.reference_generate(encoder.encode_text(prompt), 6) for prompt in PROMPTS[:6]}


async def test_a_burst_through_the_adaptive_gateway_is_prefilled_on_both_sides_and_is_exact(
        memory_stack: RunningStack, references) -> None:
    cases = list(references)
    before = _prefills(memory_stack, "gateway_adaptive")
    async with GatewayClient(memory_stack["gateway_adaptive"]) as client:
        outputs = await asyncio.gather(*(client.complete(prompt, max_tokens=tokens, temperature=0)
                                         for prompt, tokens in cases))
    assert [output.token_ids for output in outputs] == [references[case] for case in cases]
    after = _prefills(memory_stack, "gateway_adaptive")
    sent = {where: after[where] - before[where] for where in after}
    assert sent["prefill_worker"] >= 1 and sent["decode_worker"] >= 1, sent
    assert sum(sent.values()) == len(cases)
