"""`make bench-decode`: aggregate decode throughput of the running services against sequential
Hugging Face `generate`, in one run.

Starts a prefill, a decode and a gateway (default model, float32), then for 1, 8 and 32 concurrent
streams (prompt ~128 tokens, 128 new tokens each, EOS ignored) measures generated tokens per second
of wall time; and the same kind of request done one after another with `generate` in this
process. Runs the decode worker in its default mode and with --batch-invariant (every sequence
bit-identical to a batch of one), or the modes named by --modes (sdpa-attention: batched steps
attend with torch's SDPA over gathered blocks instead of the C kernel; onednn-products: batched
steps compute their products with oneDNN instead of the panel kernel; gemv-torch: a stream alone
computes its products with F.linear instead of the exact gemv kernel; no-one-stream: a stream alone
steps through the model's modules, not the one-stream path), and prints the figures side by side
with their ratios to the first mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from typing import Any

import torch

from services.client import GatewayClient
from services.common.model_files import default_cache_dir, resolve_model_dir
from services.common.runtime import ModelRuntime
from services.gateway.text import PromptEncoder
from services.stack import ServiceSpec, Stack, WorkerPlacement, free_port


def make_prompt(encoder: PromptEncoder, tokens: int, seed: int) -> str:
    """Text that tokenizes to about `tokens` tokens."""
    words = ["river", "mountain", "quiet", "engine", "garden", "signal", "paper", "window", "orbit", "honey"]
    rng = torch.Generator().manual_seed(seed)
    text = "Story:"
    while len(encoder.encode_text(text)) < tokens:
        text += " " + words[int(torch.randint(len(words), (1,), generator=rng))]
    return text


async def run_streams(address: str, prompts: list[str], new_tokens: int) -> tuple[int, float]:
    async with GatewayClient(address, timeout_seconds=900) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(client.complete(p, max_tokens=new_tokens, temperature=0, ignore_eos=True)
                                         for p in prompts))
        elapsed = time.perf_counter() - started
    return sum(len(r.token_ids) for r in results), elapsed


def hf_sequential(runtime: ModelRuntime, encoder: PromptEncoder, prompts: list[str], new_tokens: int) -> float:
    started, produced = time.perf_counter(), 0
    for prompt in prompts:
        ids = torch.tensor([encoder.encode_text(prompt)])
        model: Any = runtime.model  # a Hugging Face model: generate comes from transformers
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
        produced += out.shape[1] - ids.shape[1]
    return produced / (time.perf_counter() - started)


MODES = {"default": (), "batch-invariant": ("--batch-invariant",),
         "sdpa-attention": ("--paged-attention", "sdpa"),  # batched steps gather the blocks for torch's SDPA
         "onednn-products": ("--batched-products", "onednn"),  # batched steps on oneDNN, not the panel kernel
         "gemv-torch": ("--gemv", "torch"),  # a stream alone on F.linear, not the exact gemv kernel
         "no-one-stream": ("--no-one-stream",)}  # a stream alone through the model's modules


async def run(args: argparse.Namespace) -> dict[str, float]:
    encoder = PromptEncoder(resolve_model_dir(args.model, default_cache_dir()))
    prompts = [make_prompt(encoder, args.prompt_tokens, seed) for seed in range(max(args.streams))]
    figures: dict[str, float] = {}
    for mode in args.modes:
        for streams, value in (await run_mode(args, prompts, MODES[mode])).items():
            figures[f"{mode}_{streams}_streams_tokens_per_s"] = value
    runtime = ModelRuntime(args.model, "float32", "cpu", default_cache_dir())
    figures["hf_generate_sequential_tokens_per_s"] = hf_sequential(runtime, encoder, prompts[: args.baseline_requests],
                                                                   args.new_tokens)
    return figures


async def run_mode(args: argparse.Namespace, prompts: list[str], decode_flags: tuple[str, ...]) -> dict[int, float]:
    """Tokens per second for each stream count against a fresh stack."""
    ports = {name: free_port() for name in ("prefill", "decode", "gateway")}
    worker = ("--model", args.model, "--log-level", "WARNING", "--metrics-port", "0")
    # make up's CPU placement: decode and prefill on disjoint halves of the cores, one thread per
    # core each (two processes spinning OpenMP threads on shared cores slow each other down).
    placement = WorkerPlacement()
    specs = [ServiceSpec("prefill", "prefill", ports["prefill"],
                         ("--port", str(ports["prefill"]), *placement.args("prefill"), *worker), placement.env()),
             ServiceSpec("decode", "decode", ports["decode"],
                         ("--port", str(ports["decode"]), *placement.args("decode"), *worker, *decode_flags),
                         placement.env()),
             ServiceSpec("gateway", "gateway", ports["gateway"],
                         ("--port", str(ports["gateway"]), "--model", args.model, "--log-level", "WARNING",
                          "--metrics-port", "0", "--http-port", "0",
                          "--prefill-mode", "disaggregated",  # the decode modes compared, not where prompts go
                          "--prefill-addresses", f"127.0.0.1:{ports['prefill']}",
                          "--decode-addresses", f"127.0.0.1:{ports['decode']}"))]
    stack = Stack(specs, log_dir=tempfile.mkdtemp(prefix="bench-decode-"))
    stack.start()
    figures: dict[int, float] = {}
    try:
        stack.wait_healthy(timeout=300)
        await run_streams(specs[2].address, prompts[:1], 8)  # warm-up
        for streams in args.streams:
            tokens, elapsed = await run_streams(specs[2].address, prompts[:streams], args.new_tokens)
            figures[streams] = tokens / elapsed
    finally:
        stack.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.bench.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--baseline-requests", type=int, default=2, help="sequential generate calls to time")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["default", "batch-invariant"],
                        help="decode worker modes to measure")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    baseline = figures["hf_generate_sequential_tokens_per_s"]
    print(f"Decode throughput: model {args.model} (float32), prompt ~{args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens per stream")
    print(f"  {'sequential HF generate':28s} {baseline:8.1f} tokens/s   1.00x")
    for mode in args.modes:
        for streams in args.streams:
            value = figures[f"{mode}_{streams}_streams_tokens_per_s"]
            print(f"  {f'{mode}, {streams} streams':28s} {value:8.1f} tokens/s   {value / baseline:5.2f}x")
    first = args.modes[0]
    for mode in args.modes[1:]:
        ratios = {streams: figures[f"{mode}_{streams}_streams_tokens_per_s"]
                  / figures[f"{first}_{streams}_streams_tokens_per_s"] for streams in args.streams}
        costs = ", ".join(f"{streams} streams {ratio:.2f}x" for streams, ratio in ratios.items())
        print(f"  {mode} / {first}: {costs}")


if __name__ == "__main__":
    main()
