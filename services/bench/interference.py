"""`make bench-interference`: does a long prefill stall running decodes?

Eight streams decode 200 tokens each while a ~1,500-token prompt arrives every 2 s, run twice on
this machine: (a) unified: one worker prefills and decodes, using both cores; (b) disaggregated:
the prefill worker pinned to core 0 and the decode worker to core 1, one torch thread each.
Prints decode inter-token latency p50/p99/max and long-prompt TTFT for both, and the ratios.
Each mode runs for at most --max-seconds; figures cover what was measured by then.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from dataclasses import dataclass

from services.bench.report import percentile
from services.bench.workload import synthetic_prompt
from services.client import GatewayClient
from services.stack import ServiceSpec, Stack, free_port


@dataclass(frozen=True, slots=True)
class ModeResult:
    mode: str
    itl_p50_ms: float
    itl_p99_ms: float
    itl_max_ms: float
    long_ttft_p50_s: float
    long_ttft_max_s: float
    tokens: int
    long_prompts: int


def specs(mode: str, model: str) -> list[ServiceSpec]:
    ports = {name: free_port() for name in ("prefill", "decode", "gateway")}
    common = ("--model", model, "--log-level", "WARNING", "--metrics-port", "0")
    cores = sorted(os.sched_getaffinity(0))
    pinned = mode == "disaggregated" and len(cores) >= 2
    threads = ("--torch-threads", "1") if pinned else ()
    gateway_mode = "disaggregated" if mode == "disaggregated" else "unified"
    return [
        ServiceSpec("prefill", "prefill", ports["prefill"], ("--port", str(ports["prefill"]), *threads, *common),
                    cpus=frozenset({cores[0]}) if pinned else None),
        ServiceSpec("decode", "decode", ports["decode"], ("--port", str(ports["decode"]), *threads, *common),
                    cpus=frozenset({cores[1]}) if pinned else None),
        ServiceSpec("gateway", "gateway", ports["gateway"],
                    ("--port", str(ports["gateway"]), "--http-port", "0", "--prefill-mode", gateway_mode,
                     "--prefill-addresses", f"127.0.0.1:{ports['prefill']}",
                     "--decode-addresses", f"127.0.0.1:{ports['decode']}", *common)),
    ]


async def workload(address: str, args: argparse.Namespace) -> tuple[list[float], list[float], int]:
    import random

    rng = random.Random(0)
    itls: list[float] = []
    ttfts: list[float] = []
    tokens = 0
    deadline = time.monotonic() + args.max_seconds

    async with GatewayClient(address, timeout_seconds=args.max_seconds + 60) as client:
        async def stream(index: int) -> None:
            nonlocal tokens
            last = None
            async for chunk in client.generate(synthetic_prompt(rng, 32), max_tokens=args.new_tokens,
                                               temperature=0, ignore_eos=True, request_id=f"stream-{index}"):
                now = time.perf_counter()
                if last is not None and chunk.token_ids:
                    itls.append(now - last)
                last, tokens = now, tokens + len(chunk.token_ids)
                if time.monotonic() > deadline:
                    return

        async def long_prompt(index: int) -> None:
            started = time.perf_counter()
            async for _ in client.generate(synthetic_prompt(rng, args.long_prompt_tokens), max_tokens=1,
                                           temperature=0, request_id=f"long-{index}"):
                ttfts.append(time.perf_counter() - started)
                return

        streams = asyncio.gather(*(stream(i) for i in range(args.streams)))
        longs: list[asyncio.Future[None]] = []
        await asyncio.sleep(1.0)  # let the streams start decoding
        while not streams.done() and time.monotonic() < deadline:
            longs.append(asyncio.ensure_future(long_prompt(len(longs))))
            await asyncio.sleep(args.interval)
        await streams
        for pending in longs:
            pending.cancel()
        await asyncio.gather(*longs, return_exceptions=True)
    return itls, ttfts, tokens


async def run_mode(mode: str, args: argparse.Namespace) -> ModeResult:
    stack = Stack(specs(mode, args.model), log_dir=tempfile.mkdtemp(prefix=f"bench-{mode}-"))
    stack.start()
    try:
        stack.wait_healthy(timeout=300)
        itls, ttfts, tokens = await workload(stack.specs[2].address, args)
    finally:
        stack.stop()
    return ModeResult(mode, percentile(itls, 0.5) * 1e3, percentile(itls, 0.99) * 1e3, max(itls, default=0) * 1e3,
                      percentile(ttfts, 0.5), max(ttfts, default=0.0), tokens, len(ttfts))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.bench.interference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--long-prompt-tokens", type=int, default=1500)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between long prompts")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="cap on each mode's run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = [asyncio.run(run_mode(mode, args)) for mode in ("unified", "disaggregated")]
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
        return
    print(f"Interference: {args.streams} streams x {args.new_tokens} tokens, a {args.long_prompt_tokens}-token "
          f"prompt every {args.interval:g} s")
    print(f"  {'mode':14s} {'ITL p50':>9} {'ITL p99':>9} {'ITL max':>9} {'p99/p50':>8} "
          f"{'long TTFT p50':>14} {'max':>7} {'long prompts':>13}")
    for r in results:
        print(f"  {r.mode:14s} {r.itl_p50_ms:7.0f}ms {r.itl_p99_ms:7.0f}ms {r.itl_max_ms:7.0f}ms "
              f"{r.itl_p99_ms / max(r.itl_p50_ms, 1e-9):8.1f} {r.long_ttft_p50_s:13.2f}s {r.long_ttft_max_s:6.2f}s "
              f"{r.long_prompts:13d}")
    unified, split = results
    print(f"  unified / disaggregated: ITL p99 {unified.itl_p99_ms / max(split.itl_p99_ms, 1e-9):.1f}x, "
          f"ITL max {unified.itl_max_ms / max(split.itl_max_ms, 1e-9):.1f}x, long TTFT p50 "
          f"{unified.long_ttft_p50_s / max(split.long_ttft_p50_s, 1e-9):.2f}x")


if __name__ == "__main__":
    main()
