"""`make soak`: keep N concurrent streams going for a fixed time against a local stack of the
four services, with random prompt and output lengths, random client cancels and a share of bad
requests, then check that nothing leaked.

Prints requests done (completed, cancelled, refused), errors by gRPC code, unexpected errors,
hung requests (a call that ran into its own deadline), what the services still hold once the
streams are over (decode blocks and requests, prefill and gateway requests, kvstore entries) and
each service's resident memory at the start and the end. Exits 1 if anything leaked or hung, or an
error came that the request did not ask for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.bench.workload import parse_length, synthetic_prompt
from services.client import GatewayClient, GatewayError, RetryPolicy
from services.common.pb import common_pb2, decode_pb2_grpc, gateway_pb2_grpc, kvstore_pb2_grpc, prefill_pb2_grpc
from services.stack import Stack, free_port, local_stack

BAD_REQUESTS: list[dict[str, object]] = [
    {"prompt": ""}, {"temperature": -1.0}, {"temperature": 1e-30}, {"top_p": 2.0}, {"max_tokens": 0},
    {"max_cache_budget_mb": float("inf")}, {"max_cache_budget_mb": float("nan")}, {"request_id": "not ok!"},
]
EXPECTED_CODES = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}  # refused bad input; a full pool


@dataclass(slots=True)
class Tally:
    completed: int = 0
    cancelled: int = 0
    refused_as_bad: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    hung: int = 0

    @property
    def done(self) -> int:
        return self.completed + self.cancelled + self.refused_as_bad + sum(self.errors.values())


@dataclass(frozen=True, slots=True)
class SoakConfig:
    streams: int
    seconds: float
    max_tokens: tuple[int, int]
    prompt_words: tuple[int, int]
    cancel_share: float
    bad_share: float
    request_timeout: float


async def one_request(client: GatewayClient, config: SoakConfig, rng: random.Random, tally: Tally) -> None:
    prompt = synthetic_prompt(rng, rng.randint(*config.prompt_words))
    options: dict[str, Any] = {"max_tokens": rng.randint(*config.max_tokens), "temperature": 0,
                               "ignore_eos": True, "timeout": config.request_timeout}
    bad = rng.random() < config.bad_share
    if bad:
        options |= rng.choice(BAD_REQUESTS)
    cancel_after = rng.randint(0, int(options["max_tokens"])) if rng.random() < config.cancel_share else None
    received = 0
    try:
        async for chunk in client.generate(str(options.pop("prompt", prompt)), **options):  # type: ignore[arg-type]
            received += len(chunk.token_ids)
            if cancel_after is not None and received >= cancel_after:
                tally.cancelled += 1
                return  # leaving the loop closes the stream: the request is cancelled everywhere
        tally.completed += 1
    except GatewayError as error:
        code = error.code().name
        if bad and code == "INVALID_ARGUMENT":
            tally.refused_as_bad += 1
            return
        tally.errors[code] += 1
        if code == "DEADLINE_EXCEEDED":
            tally.hung += 1
        if code not in EXPECTED_CODES:
            tally.unexpected.append(f"{code}: {error.details()}")


async def stream_forever(address: str, config: SoakConfig, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    async with GatewayClient(address, retry=RetryPolicy(max_retries=0)) as client:
        while time.monotonic() < deadline:
            await one_request(client, config, rng, tally)


async def held(addresses: dict[str, str]) -> dict[str, int]:
    """What the services still hold."""
    async with grpc.aio.insecure_channel(addresses["decode"]) as d, grpc.aio.insecure_channel(
            addresses["prefill"]) as p, grpc.aio.insecure_channel(addresses["gateway"]) as g, \
            grpc.aio.insecure_channel(addresses["kvstore"]) as k:
        decode = await decode_pb2_grpc.DecodeServiceStub(d).Stats(common_pb2.StatsRequest(), timeout=10)
        prefill = await prefill_pb2_grpc.PrefillServiceStub(p).Stats(common_pb2.StatsRequest(), timeout=10)
        gateway = await gateway_pb2_grpc.GatewayServiceStub(g).Stats(common_pb2.StatsRequest(), timeout=10)
        store = await kvstore_pb2_grpc.KvStoreServiceStub(k).Stats(common_pb2.StatsRequest(), timeout=10)
    return {"decode_blocks": decode.blocks_used, "decode_requests": decode.active_requests,
            "prefill_requests": prefill.active_requests, "gateway_requests": gateway.active_requests,
            "kvstore_entries": store.entries}


async def settle(addresses: dict[str, str], seconds: float = 30.0) -> dict[str, int]:
    """What is still held once background cleanup had `seconds` to finish."""
    deadline = time.monotonic() + seconds
    while any((leftover := await held(addresses)).values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    return leftover


def rss_megabytes(stack: Stack) -> dict[str, float]:
    sizes = {}
    for name, process in stack.processes.items():
        with open(f"/proc/{process.pid}/status") as status:
            kilobytes = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        sizes[name] = round(kilobytes / 1024, 1)
    return sizes


async def soak(addresses: dict[str, str], config: SoakConfig, seed: int) -> tuple[Tally, dict[str, int]]:
    tally, deadline = Tally(), time.monotonic() + config.seconds
    await asyncio.gather(*(stream_forever(addresses["gateway"], config, seed + i, deadline, tally)
                           for i in range(config.streams)))
    return tally, await settle(addresses)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model of the local stack (default, tiny or a folder)")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams")
    parser.add_argument("--seconds", type=float, default=300.0, help="how long new requests are started")
    parser.add_argument("--max-tokens", type=parse_length, default=(1, 48), help="output length range LOW:HIGH")
    parser.add_argument("--prompt-words", type=parse_length, default=(1, 120), help="prompt length range LOW:HIGH")
    parser.add_argument("--cancel-share", type=float, default=0.15, help="share of requests the client cancels")
    parser.add_argument("--bad-share", type=float, default=0.05, help="share of requests with bad input")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="deadline of each request")
    parser.add_argument("--kv-pool-blocks", type=int, default=0, help="decode pool size (0: the default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    config = SoakConfig(args.streams, args.seconds, args.max_tokens, args.prompt_words, args.cancel_share,
                        args.bad_share, args.request_timeout)
    ports = {name: free_port() for name in ("gateway", "prefill", "decode", "kvstore")}
    extra = {"decode": ("--kv-pool-blocks", str(args.kv_pool_blocks))} if args.kv_pool_blocks else {}
    stack = Stack(local_stack(ports, args.model, extra=extra, log_level="WARNING"),
                  log_dir=tempfile.mkdtemp(prefix="soak-"))
    stack.start()
    try:
        stack.wait_healthy(timeout=600)
        addresses = {spec.name: spec.address for spec in stack.specs}
        rss_start = rss_megabytes(stack)
        tally, leftover = asyncio.run(soak(addresses, config, args.seed))
        rss_end = rss_megabytes(stack)
    finally:
        stack.stop()
    report = {"streams": args.streams, "seconds": args.seconds, "model": args.model, "requests": tally.done,
              "completed": tally.completed, "cancelled": tally.cancelled, "refused_as_bad": tally.refused_as_bad,
              "errors": dict(tally.errors), "unexpected": len(tally.unexpected),
              "unexpected_examples": tally.unexpected[:5], "hung": tally.hung, "leftover": leftover,
              "rss_mb_start": rss_start, "rss_mb_end": rss_end}
    print(json.dumps(report, indent=2) if args.json else _table(report))
    sys.exit(1 if tally.unexpected or tally.hung or any(leftover.values()) else 0)


def _table(report: dict[str, Any]) -> str:
    rss = "  ".join(f"{name} {report['rss_mb_start'][name]:.0f} -> {report['rss_mb_end'][name]:.0f} MB"
                    for name in report["rss_mb_start"])
    errors = ", ".join(f"{code} {count}" for code, count in report["errors"].items()) or "none"
    return "\n".join([
        f"Soak: {report['streams']} streams for {report['seconds']:.0f} s, model {report['model']}",
        f"  requests        {report['requests']}: {report['completed']} completed, {report['cancelled']} cancelled by"
        f" the client, {report['refused_as_bad']} bad ones refused with INVALID_ARGUMENT",
        f"  errors by code  {errors}",
        f"  unexpected      {report['unexpected']} {report['unexpected_examples'] or ''}",
        f"  hung requests   {report['hung']}",
        f"  left behind     {report['leftover']}",
        f"  RSS start->end  {rss}"])


if __name__ == "__main__":
    main()
