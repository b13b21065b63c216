"""`python -m services.bench` (also `make bench`): drive a workload against this gateway's gRPC API
or any OpenAI-compatible HTTP endpoint and report TTFT, TPOT, ITL and end-to-end latency
percentiles, throughput and goodput.

    python -m services.bench --grpc 127.0.0.1:50051 --concurrency 8 --num-requests 32
    python -m services.bench --openai-url http://127.0.0.1:8000/v1 --model SmolLM2-135M-Instruct \\
        --rates 0.5,1,2 --num-requests 20 --json
    python -m services.bench --grpc 127.0.0.1:50051,127.0.0.1:50061 --concurrency 4 --duration 60

`--grpc` takes several gateways, comma separated (round robin over the serving ones; a gateway
that drains or restarts is passed over). `--duration` keeps the concurrency up for that long.
Ctrl-C prints what was measured so far; SIGTERM stops starting requests, lets those in flight
finish and prints the figures (a steady load that a test or script ends when it is done).
`--shared-prefix 8:1000` puts one of 8 distinct ~1,000-token prefixes in front of each prompt
(--prompt-tokens is then the user turn after it); `--prefix-cache-compare` runs each load twice, first
with every request salted apart (no prefix cache can serve it: "cache off"), then plain ("cache on"),
`--prefill-stats ADDR[,ADDR]` and `--decode-stats ADDR[,ADDR]` read the workers' prefix-cache hit
counts (and the decode's KV bytes moved and not moved) for each run; `--multi-turn 4` makes the
requests conversations of 4 turns, each resending the conversation so far.
`python -m services.bench profile` measures the model on this machine and advises prefill/decode
worker counts (services.bench.advisor).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import signal

import sys
import time
from pathlib import Path

from services.bench.cache_stats import cache_counts, cache_delta, cache_table
from services.bench.report import Slo, summarize, table
from services.bench.targets import GrpcTarget, OpenAITarget, RequestRecord, Target
from services.bench.workload import BenchRequest, build, parse_shared_prefix
from services.common.tls_settings import add_tls_arguments, client_tls, sdk_tls_options


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self._total, self._label, self._enabled, self.done = total, label, enabled, 0

    def step(self) -> None:
        self.done += 1
        if self._enabled:
            filled = int(30 * self.done / max(self._total, 1))
            sys.stderr.write(f"\r{self._label:>14} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self._total}")
            if self.done == self._total:
                sys.stderr.write("\n")
            sys.stderr.flush()


async def run_workload(target: Target, requests: list[BenchRequest], concurrency: int | None,
                       records: list[RequestRecord], progress: Progress, stop: asyncio.Event | None = None) -> float:
    """Send every request (at most `concurrency` at once, or at its arrival time) until `stop` is
    set: requests not started by then are not sent, those in flight finish. Returns wall seconds."""
    limit = asyncio.Semaphore(concurrency or len(requests) or 1)
    stop = stop or asyncio.Event()
    started = time.perf_counter()

    async def one(request: BenchRequest) -> None:
        await asyncio.sleep(max(0.0, started + request.arrival - time.perf_counter()))
        async with limit:
            if stop.is_set():
                return
            records.append(await target.send(request))
            progress.step()

    tasks = [asyncio.ensure_future(one(request)) for request in requests]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return time.perf_counter() - started


async def run_for(target: Target, requests: list[BenchRequest], concurrency: int, seconds: float,
                  records: list[RequestRecord], stop: asyncio.Event) -> float:
    """Keep `concurrency` requests in flight, cycling through `requests`, for `seconds` or until
    `stop` is set; those in flight then finish and count. Returns wall seconds."""
    started = time.perf_counter()
    source = itertools.cycle(requests)

    async def worker() -> None:
        while not stop.is_set() and time.perf_counter() - started < seconds:
            records.append(await target.send(next(source)))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


def make_target(args: argparse.Namespace) -> Target:
    if args.openai_url:
        tls = client_tls(args)
        return OpenAITarget(args.openai_url, args.model, args.api_key, tls.ssl_context() if tls else True)
    return GrpcTarget(args.grpc, args.api_key, sdk_tls_options(args))


async def bench(args: argparse.Namespace, runs: list[dict[str, object]], live: list[RequestRecord],
                terminated: asyncio.Event) -> None:
    """The runs; SIGTERM sets `terminated`: no new request starts, those in flight finish and count."""
    slo = Slo(args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000)
    target = make_target(args)
    with contextlib.suppress(ValueError, RuntimeError):  # not in the main thread: no SIGTERM handling
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminated.set)
    try:
        if args.warmup:  # salted: the warm-up fills no prefix cache
            warm = build(args.warmup, args.prompt_tokens, args.output_tokens, None, args.seed + 1, args.prompts_file,
                         args.shared_prefix, salted=True, turns=args.multi_turn)
            await run_workload(target, warm, args.concurrency or 4, [], Progress(0, "", False), terminated)
        for rate, salted in itertools.product(args.rates or [None], (True, False) if args.prefix_cache_compare
                                              else (False,)):
            if terminated.is_set():
                break
            label = (f"rate {rate:g}/s" if rate else f"conc {args.concurrency}") + (
                (" off" if salted else " on") if args.prefix_cache_compare else "")
            requests = build(args.num_requests, args.prompt_tokens, args.output_tokens, rate, args.seed,
                             args.prompts_file, args.shared_prefix, salted, args.multi_turn)
            live.clear()
            counts_before = await cache_counts(args.prefill_stats, args.decode_stats)
            started = time.perf_counter()
            try:
                if args.duration:
                    wall = await run_for(target, requests, args.concurrency, args.duration, live, terminated)
                else:
                    wall = await run_workload(target, requests, None if rate else args.concurrency, live,
                                              Progress(len(requests), label, not args.json), terminated)
            finally:
                runs.append(summarize(list(live), time.perf_counter() - started, slo, label))
            runs[-1]["duration_s"] = wall
            if args.prefill_stats or args.decode_stats:
                runs[-1]["prefix_cache"] = cache_delta(counts_before, await cache_counts(args.prefill_stats,
                                                                                         args.decode_stats))
    finally:
        with contextlib.suppress(ValueError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
        await target.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--grpc", default="127.0.0.1:50051",
                       help="gateway gRPC address (default), or several comma separated: round robin over the "
                       "serving ones")
    where.add_argument("--openai-url", help="an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="model id for --openai-url")
    parser.add_argument("--api-key", default=None)
    add_tls_arguments(parser)
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    load.add_argument("--rates", type=lambda v: [float(x) for x in v.split(",")],
                      help="Poisson arrival rates (requests/s), comma separated: a sweep")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--duration", type=float, default=0.0,
                        help="with --concurrency: keep that many requests in flight for this many seconds, cycling "
                        "through --num-requests requests (those in flight at the end finish and count)")
    parser.add_argument("--prompt-tokens", default="128", help="N or LOW:HIGH (uniform)")
    parser.add_argument("--output-tokens", default="64", help="N or LOW:HIGH (uniform)")
    parser.add_argument("--prompts-file", type=Path, help='JSONL of {"prompt": ..., "max_tokens": ...}')
    parser.add_argument("--shared-prefix", type=parse_shared_prefix, metavar="GROUPS:TOKENS",
                        help="put one of GROUPS distinct prefixes of about TOKENS tokens in front of each prompt")
    parser.add_argument("--prefix-cache-compare", action="store_true",
                        help="run each load with every request salted apart (cache off), then plain (cache on)")
    parser.add_argument("--prefill-stats", type=lambda v: [a for a in v.split(",") if a], default=[],
                        metavar="ADDR[,ADDR]", help="prefill workers whose prefix-cache counts each run reports")
    parser.add_argument("--decode-stats", type=lambda v: [a for a in v.split(",") if a], default=[],
                        metavar="ADDR[,ADDR]", help="decode workers whose prefix-cache counts and KV bytes received "
                        "and not needed each run reports")
    parser.add_argument("--multi-turn", type=int, default=1, metavar="TURNS",
                        help="conversations of TURNS turns: each turn resends the conversation so far (user turns of "
                        "--prompt-tokens and synthetic replies of --output-tokens) with a new user turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=2, help="requests sent (and not counted) first")
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=200.0)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--plot", type=Path, help="save latency percentiles and goodput per run as a PNG")
    args = parser.parse_args(argv)
    if args.rates:
        args.concurrency = None
    if args.num_requests <= 0 or (args.concurrency is not None and args.concurrency <= 0):
        parser.error("--num-requests and --concurrency must be > 0")
    if args.multi_turn <= 0:
        parser.error("--multi-turn must be > 0")
    if args.duration < 0 or (args.duration and args.rates):
        parser.error("--duration must be >= 0 and goes with --concurrency, not --rates")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["profile"]:
        from services.bench.profile import main as profile_main

        profile_main(argv[1:])
        return
    args = parse_args(argv)
    runs: list[dict[str, object]] = []
    live: list[RequestRecord] = []
    terminated = asyncio.Event()
    interrupted = False
    try:
        asyncio.run(bench(args, runs, live, terminated))
    except KeyboardInterrupt:
        interrupted = True
    print(json.dumps({"runs": runs, "interrupted": interrupted, "terminated": terminated.is_set()}, indent=2)
          if args.json else table(runs) + cache_table(runs)
          + ("\n(interrupted: figures so far)" if interrupted else "")
          + ("\n(SIGTERM: stopped early)" if terminated.is_set() else ""))
    if args.plot and runs:
        from services.bench.plot import plot

        plot(runs, args.plot)


if __name__ == "__main__":
    main()
