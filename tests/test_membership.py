"""Live membership with real worker processes (tiny model): a gateway reading address files routes
only to workers whose health says SERVING; a draining worker stops getting traffic at once and a
restarted one gets it back; workers added to the files get traffic within 2 s of turning SERVING;
SIGTERM to a decode and a prefill worker under load loses no request; Stats and /metrics show each
worker's state."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.client import GatewayClient, RetryPolicy
from services.stack import ServiceSpec, Stack, free_port
from tests.membership_helpers import (gateway_spec, gateway_stats, requests_total, start, states, wait_serving,
                                      wait_state, worker_spec, write_addresses)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time,",
           "The three primary colors are", "import numpy as np", "My favourite food is", "In 1969, the"]
NO_RETRY = RetryPolicy(max_retries=0)  # the gateway itself must lose nothing


@dataclass
class Cluster:
    stack: Stack
    specs: dict[str, ServiceSpec]
    files: dict[str, Path]
    gateway: str
    metrics_port: int

    def write(self, role: str, *names_or_addresses: str) -> None:
        write_addresses(self.files[role], [self.specs[n].address if n in self.specs else n
                                           for n in names_or_addresses])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("membership")
    specs = {name: worker_spec(name, name.rstrip("0123456789"))
             for name in ("prefill1", "prefill2", "decode1", "decode2")}
    files = {role: log_dir / f"{role}-addresses" for role in ("prefill", "decode")}
    metrics_port = free_port()
    specs["gateway"] = gateway_spec("gateway", "--prefill-addresses-file", str(files["prefill"]),
                                    "--decode-addresses-file", str(files["decode"]), metrics_port=metrics_port)
    running = Cluster(Stack(list(specs.values()), log_dir=str(log_dir)), specs, files, specs["gateway"].address,
                      metrics_port)
    running.write("prefill", "prefill1", "prefill2")
    running.write("decode", "decode1", "decode2")
    running.stack.start()
    try:
        running.stack.wait_healthy(timeout=300)
        yield running
    finally:
        running.stack.stop()


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name.startswith("disagg_gateway_worker")}


async def test_stats_and_metrics_show_each_workers_state(cluster: Cluster) -> None:
    dead = f"127.0.0.1:{free_port()}"  # listed, nothing listening
    cluster.write("decode", "decode1", "decode2", dead)
    await wait_state(cluster.gateway, dead, "unreachable", 5)
    assert await states(cluster.gateway) == {
        **{spec.address: "serving" for name, spec in cluster.specs.items() if name != "gateway"}, dead: "unreachable"}
    stats = await gateway_stats(cluster.gateway)
    assert {w.role for w in stats.workers if w.address == dead} == {"decode"}
    metrics = await asyncio.to_thread(_scrape, cluster.metrics_port)
    up = {labels: value for (name, labels), value in metrics.items() if name == "disagg_gateway_worker_up"}
    assert up[(("address", dead), ("role", "decode"))] == 0.0
    assert up[(("address", cluster.specs["decode1"].address), ("role", "decode"))] == 1.0
    counts = {labels: value for (name, labels), value in metrics.items() if name == "disagg_gateway_workers"}
    assert counts[(("role", "decode"), ("state", "serving"))] == 2.0
    assert counts[(("role", "decode"), ("state", "unreachable"))] == 1.0
    assert counts[(("role", "prefill"), ("state", "serving"))] == 2.0
    assert metrics[("disagg_gateway_worker_state", (("address", dead), ("role", "decode"),
                                                     ("state", "unreachable")))] == 1.0
    cluster.write("decode", "decode1", "decode2")
    deadline = time.monotonic() + 5
    while dead in await states(cluster.gateway):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def _busy_decode(cluster: Cluster) -> str:
    stats = await gateway_stats(cluster.gateway)
    busy = [w.address for w in stats.workers if w.role == "decode" and w.active_requests]
    assert len(busy) == 1, stats
    return next(name for name, spec in cluster.specs.items() if spec.address == busy[0])


async def test_a_draining_worker_gets_no_traffic_and_a_restarted_one_gets_it_back(cluster: Cluster) -> None:
    async with GatewayClient(cluster.gateway, retry=NO_RETRY) as client:
        stream = client.generate("Once upon a time", max_tokens=400, temperature=0, ignore_eos=True)
        tokens = len((await anext(stream)).token_ids)
        victim = cluster.specs[await _busy_decode(cluster)]
        other = cluster.specs["decode2" if victim.name == "decode1" else "decode1"]
        before = await requests_total(other)
        cluster.stack.processes[victim.name].send_signal(signal.SIGTERM)
        assert await wait_state(cluster.gateway, victim.address, "not_serving", 2) < 1.0
        for prompt in PROMPTS[:4]:
            assert len((await client.complete(prompt, max_tokens=4, temperature=0, ignore_eos=True)).token_ids) == 4
        assert (await states(cluster.gateway))[victim.address] == "not_serving"  # never tried, so never failed
        assert await requests_total(other) == before + 4
        async for chunk in stream:  # the draining worker finishes what it has
            tokens += len(chunk.token_ids)
            last = chunk
        assert tokens == 400 and last.finish_reason == "length"
    assert await asyncio.to_thread(cluster.stack.processes[victim.name].wait, 30) == 0
    restarted = start(cluster.stack, victim)
    serving_at = await asyncio.to_thread(wait_serving, victim, restarted)
    await wait_state(cluster.gateway, victim.address, "serving", 5)
    assert time.monotonic() - serving_at < 2.0
    async with GatewayClient(cluster.gateway, retry=NO_RETRY) as client:
        for prompt in PROMPTS[:2]:  # idle workers take turns
            await client.complete(prompt, max_tokens=4, temperature=0)
    assert await requests_total(victim) >= 1


async def _added_gets_traffic(cluster: Cluster, spec: ServiceSpec, serving_at: float) -> None:
    await wait_state(cluster.gateway, spec.address, "serving", 5)
    assert time.monotonic() - serving_at < 2.0, "not routed to within 2 s of turning SERVING"


async def test_workers_added_to_the_address_files_get_traffic_within_2s(cluster: Cluster) -> None:
    decode3, prefill3 = worker_spec("decode3", "decode"), worker_spec("prefill3", "prefill")
    cluster.specs |= {"decode3": decode3, "prefill3": prefill3}
    cluster.write("decode", "decode1", "decode2", "decode3")  # listed first, then started
    await wait_state(cluster.gateway, decode3.address, "unreachable", 5)
    process = start(cluster.stack, decode3)
    await _added_gets_traffic(cluster, decode3, await asyncio.to_thread(wait_serving, decode3, process))
    process = start(cluster.stack, prefill3)  # started, then listed
    serving_at = await asyncio.to_thread(wait_serving, prefill3, process)
    cluster.write("prefill", "prefill1", "prefill2", "prefill3")
    await _added_gets_traffic(cluster, prefill3, serving_at)
    async with GatewayClient(cluster.gateway, retry=NO_RETRY) as client:
        for prompt in PROMPTS[:3]:  # idle workers take turns
            await client.complete(prompt, max_tokens=4, temperature=0)
    assert await requests_total(decode3) >= 1 and await requests_total(prefill3) >= 1
    cluster.write("decode", "decode1", "decode2")  # scaled down again
    cluster.write("prefill", "prefill1", "prefill2")
    deadline = time.monotonic() + 5
    while {decode3.address, prefill3.address} & set(await states(cluster.gateway)):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    for name in ("decode3", "prefill3"):
        cluster.stack.processes[name].send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(cluster.stack.processes[name].wait, 30) == 0


async def _keep_generating(client: GatewayClient, prompt: str, expected: list[int], stop: asyncio.Event,
                           outcomes: list[bool]) -> None:
    while not stop.is_set():
        completion = await client.complete(prompt, max_tokens=24, temperature=0, ignore_eos=True, timeout=60)
        outcomes.append(completion.token_ids == expected and completion.finish_reason == "length")


async def _sigterm(cluster: Cluster, name: str) -> None:
    assert await requests_total(cluster.specs[name]) > 0
    cluster.stack.processes[name].send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(cluster.stack.processes[name].wait, 60) == 0
    await asyncio.sleep(1.0)


async def test_sigterm_to_a_decode_and_a_prefill_worker_under_load_loses_no_request(cluster: Cluster) -> None:
    async with GatewayClient(cluster.gateway, retry=NO_RETRY) as client:
        expected = {p: (await client.complete(p, max_tokens=24, temperature=0, ignore_eos=True)).token_ids
                    for p in PROMPTS}
        stop, outcomes = asyncio.Event(), []
        streams = [asyncio.ensure_future(_keep_generating(client, p, expected[p], stop, outcomes)) for p in PROMPTS]
        try:
            await asyncio.sleep(1.0)
            await _sigterm(cluster, "decode1")
            await _sigterm(cluster, "prefill1")
        finally:
            stop.set()
            ended = await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True), 120)
    assert [error for error in ended if error is not None] == []
    assert len(outcomes) >= 2 * len(PROMPTS) and all(outcomes), outcomes
    now = await states(cluster.gateway)
    # gone: its watch broke (unreachable), or a call it refused while draining put it in backoff first
    assert {now[cluster.specs["decode1"].address], now[cluster.specs["prefill1"].address]} <= {"unreachable", "backoff"}
