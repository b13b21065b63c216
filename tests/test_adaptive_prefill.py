"""`--prefill-mode adaptive` (services/gateway/placement.py): a short prompt goes to the shorter
queue, the prefill workers' or the decode workers' own; through the services, a burst of short
prompts is prefilled on both sides and every output is Hugging Face's."""

from __future__ import annotations

import asyncio
from contextlib import ExitStack

import pytest

from services.client import GatewayClient
from services.common.backoff import Backoff
from services.common.config import parse_settings
from services.gateway.placement import PrefillPlacement
from services.gateway.routing import Worker, WorkerPool, WorkerState
from services.gateway.settings import GatewaySettings
from tests.conftest import PROMPTS, RunningStack
from tests.test_observability import _scrape


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


def test_a_burst_of_short_prompts_alternates_between_the_two_queues() -> None:
    """Each prompt counts from the moment it is placed, on either side: a burst whose requests are
    all placed before any first token comes spreads over both."""
    placement = PrefillPlacement("adaptive", 256, pool("prefill", "p:1"), pool("decode", "d:1"))
    with ExitStack() as burst:
        places = [burst.enter_context(placement.placed(100)) for _ in range(5)]
        assert [place.local for place in places] == [False, True, False, True, False]  # ties: a prefill worker
        assert placement.waiting == {False: 3, True: 2}
        places[1].prefilled()  # the decode's first prompt is prefilled: its queue is the shorter
        places[1].prefilled()  # (counted once)
        assert placement.waiting == {False: 3, True: 1}
        with placement.placed(100) as sixth:
            assert sixth.local
    assert placement.waiting == {False: 0, True: 0}  # every place ends with its try


def test_adaptive_mode_keeps_long_prompts_and_a_quiet_system_on_the_prefill_workers() -> None:
    placement = PrefillPlacement("adaptive", 256, pool("prefill", "p:1"), pool("decode", "d:1"))
    with placement.placed(10) as alone:
        assert not alone.local  # nothing queued anywhere
        with placement.placed(256) as long:
            assert not long.local  # not shorter than the threshold
            with placement.placed(255) as short:
                assert short.local


def test_adaptive_mode_counts_per_serving_worker_of_each_side() -> None:
    prefill, decode = pool("prefill", "p:1", "p:2"), pool("decode", "d:1", "d:2")
    placement = PrefillPlacement("adaptive", 256, prefill, decode)
    with ExitStack() as held:
        assert not held.enter_context(placement.placed(10)).local  # 0 per decode worker, 0 per prefill worker
        assert held.enter_context(placement.placed(10)).local  # 0 against 1/2
        assert not held.enter_context(placement.placed(10)).local  # 1/2 against 1/2
        prefill.set_health(prefill.workers[1], WorkerState.NOT_SERVING)
        assert held.enter_context(placement.placed(10)).local  # 1/2 against 2/1
        decode.set_health(decode.workers[1], WorkerState.NOT_SERVING)
        assert not held.enter_context(placement.placed(10)).local  # 2/1 against 2/1: a tie
        prefill.set_health(prefill.workers[0], WorkerState.UNREACHABLE)
        assert held.enter_context(placement.placed(10)).local  # no prefill worker serves: the decode worker
        assert not held.enter_context(placement.placed(300)).local  # (a long prompt fails there, as before)


@pytest.mark.parametrize(("mode", "places"), [("disaggregated", [False, False]), ("unified", [True, True]),
                                              ("conditional", [True, False])])
def test_the_other_modes_ignore_load(mode: str, places: list[bool]) -> None:
    placement = PrefillPlacement(mode, 256, pool("prefill", "p:1"), pool("decode", "d:1"))
    with ExitStack() as held:
        assert [held.enter_context(placement.placed(tokens)).local for tokens in (10, 300, 10, 300)] == places * 2


def test_an_unknown_prefill_mode_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="prefill_mode must be one of"):
        parse_settings(GatewaySettings, "gateway", "", ["--prefill-mode", "balanced"], {})
    with pytest.raises(ValueError, match="prefill mode must be one of"):
        PrefillPlacement("balanced", 256, pool("prefill", "p:1"), pool("decode", "d:1"))
    assert parse_settings(GatewaySettings, "gateway", "", [], {}).prefill_mode == "adaptive"
    assert parse_settings(GatewaySettings, "gateway", "", [], {"PREFILL_MODE": "adaptive"}).prefill_mode == "adaptive"


def _prefills(stack: RunningStack, gateway: str) -> dict[str, float]:
    """The gateway's `disagg_gateway_prefills_total`, by where."""
    metrics = _scrape(stack.metrics_ports[gateway])
    return {where: metrics.get(f"disagg_gateway_prefills_total|where={where}", 0.0)
            for where in ("prefill_worker", "decode_worker")}


@pytest.fixture(scope="module")
def references(runtime, encoder) -> dict[tuple[str, int], list[int]]:
    return {(prompt, 6): runtime.reference_generate(encoder.encode_text(prompt), 6) for prompt in PROMPTS[:6]}


async def test_a_burst_through_the_adaptive_gateway_is_prefilled_on_both_sides_and_is_exact(
        memory_stack: RunningStack, references) -> None:
    cases = list(references)
    before = _prefills(memory_stack, "gateway_adaptive")
    async with GatewayClient(memory_stack["gateway_adaptive"]) as client:
        # all placed within milliseconds, before any first token (tens of ms away): both sides take some
        outputs = await asyncio.gather(*(client.complete(prompt, max_tokens=tokens, temperature=0)
                                         for prompt, tokens in cases))
    assert [output.token_ids for output in outputs] == [references[case] for case in cases]
    after = _prefills(memory_stack, "gateway_adaptive")
    sent = {where: after[where] - before[where] for where in after}
    assert sent["prefill_worker"] >= 1 and sent["decode_worker"] >= 1, sent
    assert sum(sent.values()) == len(cases)
