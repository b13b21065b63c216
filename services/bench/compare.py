"""`make bench-compare` (`python -m services.bench.compare`): this project side by side with any
OpenAI-compatible server, in one run, with the same client code (streaming /v1/completions).

Starts this stack (`make up`'s CPU placement, default model, float32, free ports) and measures the
workloads of issue 13's table against it and, with `--peer-url`, against the peer (e.g. vLLM
serving the same weights):

  1 stream   a ~--prompt-tokens prompt, --new-tokens tokens: TTFT and time per output token; for this
             stack also the decode step time in the same run (the decode's own histogram) and the
             ratio end-to-end TPOT / step: what the hops, detokenization and hand-offs add
  N streams  --streams concurrent requests (--new-tokens each, EOS ignored): output tokens/s
  mixed      --mixed-streams concurrent requests, prompts of --mixed-prompt words, TPOT p50
  interference  --interference-streams streams decode while --long-prompt-words prompts arrive
             every --interference-interval s: inter-token latency p50, p99, max

Then Hugging Face `generate` in this process on the same prompt (per-token time) as a second
reference, after the stack stopped. Figures taken while other work loads the machine are noisy:
compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from services.bench.targets import OpenAITarget, RequestRecord
from services.bench.workload import BenchRequest, synthetic_prompt
from services.stack import Stack, WorkerPlacement, free_port, local_stack

STEP_METRIC = "disagg_decode_time_per_output_token_seconds"


@dataclass(slots=True)
class Column:
    """One server's figures, by workload key."""

    name: str
    figures: dict[str, float] = field(default_factory=dict)


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


async def one_stream(target: OpenAITarget, prompt: str, new_tokens: int, repeats: int) -> dict[str, float]:
    # Each run opens with its own words, so no server's prefix cache holds any of its blocks (the
    # warm-up sent the prompt's start): TTFT is a cold prefill on both sides.
    records = [await target.send(BenchRequest(f"Run {run}. {prompt}", new_tokens, 0)) for run in range(repeats)]
    checked(records)
    return {"ttft_ms": statistics.median(r.ttft for r in records) * 1e3,
            "tpot_ms": statistics.median(r.tpot for r in records) * 1e3}


async def streams(target: OpenAITarget, prompts: list[str], new_tokens: int) -> list[RequestRecord]:
    return checked(list(await asyncio.gather(*(target.send(BenchRequest(p, new_tokens, 0)) for p in prompts))))


def checked(records: list[RequestRecord]) -> list[RequestRecord]:
    failed = [r.error for r in records if r.error or not r.token_times]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(records)} requests failed: {failed[:2]}")
    return records


async def interference(target: OpenAITarget, args: argparse.Namespace, rng: random.Random) -> dict[str, float]:
    decoding = [synthetic_prompt(rng, 64) for _ in range(args.interference_streams)]
    main = asyncio.ensure_future(streams(target, decoding, args.interference_tokens))
    arrivals: list[asyncio.Future[RequestRecord]] = []
    while not main.done():
        arrivals.append(asyncio.ensure_future(target.send(BenchRequest(synthetic_prompt(rng, args.long_prompt_words),
                                                                       1, 0))))
        await asyncio.wait([main], timeout=args.interference_interval)
    itls = [itl for record in await main for itl in record.itls]
    long_prompts = await asyncio.gather(*arrivals)  # an overloaded prefill may refuse some: a figure too
    return {"itl_p50_ms": percentile(itls, 0.5) * 1e3, "itl_p99_ms": percentile(itls, 0.99) * 1e3,
            "itl_max_ms": max(itls) * 1e3, "long_prompts_failed": float(sum(bool(r.error) for r in long_prompts))}


async def measure(target: OpenAITarget, args: argparse.Namespace, prompt: str,
                  step_port: int | None) -> dict[str, float]:
    rng = random.Random(args.seed)
    await target.send(BenchRequest(prompt[:200], 4, 0))  # warm-up
    before = step_seconds(step_port) if step_port else None
    figures = await one_stream(target, prompt, args.new_tokens, args.repeats)
    if before is not None and step_port:
        after = step_seconds(step_port)
        figures["step_ms"] = (after[0] - before[0]) / max(1.0, after[1] - before[1]) * 1e3
        figures["tpot_over_step"] = figures["tpot_ms"] / figures["step_ms"]
    for count in args.streams:
        started = time.perf_counter()
        records = await streams(target, [synthetic_prompt(rng, 128) for _ in range(count)], args.new_tokens)
        figures[f"tokens_per_s_{count}"] = sum(r.completion_tokens for r in records) / (time.perf_counter() - started)
    if args.mixed_streams:
        low, high = (int(part) for part in args.mixed_prompt.split(":"))
        records = await streams(target, [synthetic_prompt(rng, rng.randint(low, high))
                                         for _ in range(args.mixed_streams)], args.new_tokens)
        figures["mixed_tpot_p50_ms"] = percentile([r.tpot for r in records], 0.5) * 1e3
    if args.interference_streams:
        figures |= await interference(target, args, rng)
    return figures


def served_model(base_url: str, api_key: str | None) -> str:
    """The first model an OpenAI-compatible server lists."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=30)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


def step_seconds(port: int) -> tuple[float, float]:
    """(sum, count) of the decode's step-time histogram."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = re.search(rf"^{STEP_METRIC}_sum (\S+)$", text, re.MULTILINE)
    count = re.search(rf"^{STEP_METRIC}_count (\S+)$", text, re.MULTILINE)
    return (float(total.group(1)), float(count.group(1))) if total and count else (0.0, 0.0)


async def ours(args: argparse.Namespace, prompt: str) -> dict[str, float]:
    names = ("gateway", "prefill", "decode", "kvstore")
    ports = {name: free_port() for name in names} | {"http": free_port()}
    metrics = {"decode": free_port()}
    placement = WorkerPlacement() if args.placement == "auto" else WorkerPlacement("", "", 0, 0, "")
    stack = Stack(local_stack(ports, args.model, log_level="WARNING", metrics_ports=metrics, placement=placement),
                  log_dir=tempfile.mkdtemp(prefix="bench-compare-"))
    stack.start()
    try:
        stack.wait_healthy(timeout=600)
        url = f"http://127.0.0.1:{ports['http']}/v1"
        target = OpenAITarget(url, served_model(url, None), None)
        try:
            return await measure(target, args, prompt, metrics["decode"])
        finally:
            await target.close()
    finally:
        stack.stop()


async def peer(args: argparse.Namespace, prompt: str) -> dict[str, float]:
    target = OpenAITarget(args.peer_url, args.peer_model or served_model(args.peer_url, args.peer_api_key),
                          args.peer_api_key)
    try:
        return await measure(target, args, prompt, None)
    finally:
        await target.close()


def hf_generate(args: argparse.Namespace, prompt: str) -> dict[str, float]:
    """Per-token time of Hugging Face `generate` in this process: (n + 1 tokens - 1 token) / n."""
    import torch

    from services.common.model_files import default_cache_dir, resolve_model_dir
    from services.common.runtime import ModelRuntime
    from services.gateway.text import PromptEncoder

    if args.hf_threads:
        torch.set_num_threads(args.hf_threads)
    runtime = ModelRuntime(args.model, "float32", "cpu", default_cache_dir())
    ids = torch.tensor([PromptEncoder(resolve_model_dir(args.model, default_cache_dir())).encode_text(prompt)])

    def timed(tokens: int) -> float:
        started = time.perf_counter()
        model: Any = runtime.model  # a Hugging Face model: generate comes from transformers
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                       min_new_tokens=tokens, do_sample=False)
        return time.perf_counter() - started

    timed(2)
    per_token = statistics.median((timed(args.new_tokens + 1) - timed(1)) / args.new_tokens
                                  for _ in range(args.repeats))
    return {"tpot_ms": per_token * 1e3, "prompt_tokens": float(ids.shape[1]), "threads": float(torch.get_num_threads())}


ROWS = (("1 stream: TTFT ms", "ttft_ms", True), ("1 stream: TPOT ms", "tpot_ms", True),
        ("1 stream: decode step ms", "step_ms", True), ("1 stream: TPOT / step", "tpot_over_step", True),
        ("mixed: TPOT p50 ms", "mixed_tpot_p50_ms", True), ("interference: ITL p50 ms", "itl_p50_ms", True),
        ("interference: ITL p99 ms", "itl_p99_ms", True), ("interference: ITL max ms", "itl_max_ms", True),
        ("interference: long failed", "long_prompts_failed", True))


def render(columns: list[Column], hf: dict[str, float], args: argparse.Namespace) -> str:
    ours_column, peer_column = columns[0], columns[1] if len(columns) > 1 else None
    rows = list(ROWS[:4]) + [(f"{n} streams: tokens/s", f"tokens_per_s_{n}", False) for n in args.streams] + \
        list(ROWS[4:])
    peer_name = peer_column.name if peer_column else ""
    header = f"{'workload':28s} {peer_name:>12s} {'this project':>13s} {'ratio':>16s} {'HF generate':>12s}"
    title = (f"Side by side: model {args.model} (float32), prompt ~{int(hf.get('prompt_tokens', 0))} tokens, "
             f"{args.new_tokens} new tokens; HF generate with {int(hf.get('threads', 0))} torch threads")
    lines = [title, header]
    for label, key, lower_better in rows:
        if key not in ours_column.figures:
            continue
        mine = ours_column.figures[key]
        theirs = peer_column.figures.get(key) if peer_column else None
        ratio = ""
        if theirs and mine:
            better = mine < theirs if lower_better else mine > theirs
            ratio = f"{mine / theirs:.2f}x ({'better' if better else 'worse'})"
        reference = f"{hf[key]:12.1f}" if key == "tpot_ms" else ""
        lines.append(f"{label:28s} {'' if theirs is None else f'{theirs:12.1f}':>12s} {mine:13.2f} {ratio:>16s} "
                     f"{reference}")
    if "step_ms" in ours_column.figures:
        lines.append(f"decode step / HF generate per token: {ours_column.figures['step_ms'] / hf['tpot_ms']:.2f}x; "
                     f"TPOT through the gateway / HF: {ours_column.figures['tpot_ms'] / hf['tpot_ms']:.2f}x")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--peer-url", default="", help="an OpenAI-compatible base URL, e.g. http://127.0.0.1:8001/v1")
    parser.add_argument("--peer-model", default="", help="the model name to ask the peer for (default: the first "
                        "it lists at /v1/models)")
    parser.add_argument("--peer-api-key", default=None)
    parser.add_argument("--peer-name", default="peer")
    parser.add_argument("--placement", choices=("auto", "none"), default="auto", help="this stack's CPU placement")
    parser.add_argument("--prompt-words", type=int, default=450, help="1-stream prompt (~1 token per word)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="1-stream runs (the median is reported)")
    parser.add_argument("--streams", type=int, nargs="*", default=[16, 32])
    parser.add_argument("--mixed-streams", type=int, default=16)
    parser.add_argument("--mixed-prompt", default="128:512", help="LOW:HIGH prompt words of the mixed workload")
    parser.add_argument("--interference-streams", type=int, default=8, help="0 skips the interference workload")
    parser.add_argument("--interference-tokens", type=int, default=128)
    parser.add_argument("--interference-interval", type=float, default=2.0)
    parser.add_argument("--long-prompt-words", type=int, default=1500)
    parser.add_argument("--hf-threads", type=int, default=0, help="torch threads of the in-process HF reference "
                        "(0: torch's default, one per core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> tuple[list[Column], dict[str, float]]:
    prompt = synthetic_prompt(random.Random(args.seed), args.prompt_words)
    columns = [Column("this project", await ours(args, prompt))]
    if args.peer_url:
        columns.append(Column(args.peer_name, await peer(args, prompt)))
    return columns, hf_generate(args, prompt)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    columns, hf = asyncio.run(run(args))
    if args.json:
        print(json.dumps({"columns": {c.name: c.figures for c in columns}, "hf_generate": hf}, indent=2))
    else:
        print(render(columns, hf, args))


if __name__ == "__main__":
    main()
