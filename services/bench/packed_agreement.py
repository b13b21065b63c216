"""`make bench-packed` (`python -m services.bench.packed_agreement`): what `--packed-weights all` does
to greedy output and to speed, in one process.

Hugging Face `generate` (greedy, EOS ignored) on the varied prompts of the fp8 benchmark, once with
the model as loaded (MKL's `F.linear`: what the default stack computes for a stream alone) and once
with every linear layer packed for oneDNN (`pack_linears`: what the prefill and a decode batch of
one compute with `--packed-weights all`); prints the share of identical tokens position by position,
the first divergence, and the time per generated token of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from services.bench.fp8_prompts import PROMPTS
from services.common.model_files import default_cache_dir
from services.common.packed_weights import pack_linears
from services.common.runtime import ModelRuntime
from services.gateway.text import PromptEncoder


@dataclass(frozen=True, slots=True)
class PackedReport:
    prompts: int
    tokens_each: int
    identical_tokens: float  # share of positions where both produced the same token
    identical_prompts: int
    first_divergence_mean: float  # tokens_each when none
    first_divergence_min: int
    ms_per_token_plain: float
    ms_per_token_packed: float


def greedy(runtime: ModelRuntime, ids: list[int], count: int) -> tuple[list[int], float]:
    prompt = torch.tensor([ids])
    started = time.perf_counter()
    model: Any = runtime.model  # a Hugging Face model: generate comes from transformers
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=count,
                         min_new_tokens=count, do_sample=False)
    return out[0, len(ids):].tolist(), time.perf_counter() - started


def run(args: argparse.Namespace) -> PackedReport:
    plain = ModelRuntime(args.model, "float32", "cpu", default_cache_dir())
    packed = ModelRuntime(args.model, "float32", "cpu", default_cache_dir())
    if not pack_linears(packed.model, packed.device):
        raise SystemExit("oneDNN weight packing is not available in this torch build")
    encoder = PromptEncoder(plain.model_dir)
    prompts = [encoder.encode_text(text) for text in PROMPTS[: args.prompts]]
    greedy(plain, prompts[0], 2), greedy(packed, prompts[0], 2)  # warm-up
    same, divergences, seconds = 0, [], {"plain": 0.0, "packed": 0.0}
    for ids in prompts:
        expected, seconds_plain = greedy(plain, ids, args.tokens)
        got, seconds_packed = greedy(packed, ids, args.tokens)
        seconds["plain"] += seconds_plain
        seconds["packed"] += seconds_packed
        same += sum(a == b for a, b in zip(expected, got))
        divergences.append(next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), args.tokens))
    total = len(prompts) * args.tokens
    return PackedReport(len(prompts), args.tokens, same / total, sum(d == args.tokens for d in divergences),
                        statistics.mean(divergences), min(divergences), seconds["plain"] / total * 1e3,
                        seconds["packed"] / total * 1e3)


def main(argv: list[str] | None = None) -> PackedReport:
    parser = argparse.ArgumentParser(prog="python -m services.bench.packed_agreement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many (at most {len(PROMPTS)})")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 0 < args.prompts <= len(PROMPTS) or args.tokens < 1:
        parser.error(f"--prompts must be 1..{len(PROMPTS)} and --tokens at least 1")
    report = run(args)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
        return report
    print(f"--packed-weights all vs the model's own products: model {args.model} (float32), "
          f"{report.prompts} prompts x {report.tokens_each} greedy tokens (HF generate, in process)")
    print(f"  identical tokens     {report.identical_tokens:6.1%} ({report.identical_prompts}/{report.prompts} "
          f"prompts identical throughout)")
    print(f"  first divergence     mean {report.first_divergence_mean:.1f}, min {report.first_divergence_min} "
          f"(of {report.tokens_each}; {report.tokens_each} = none)")
    print(f"  ms per token         plain {report.ms_per_token_plain:.1f}, packed {report.ms_per_token_packed:.1f} "
          f"({report.ms_per_token_plain / report.ms_per_token_packed:.2f}x)")
    return report


if __name__ == "__main__":
    main()
