"""`make bench-fp8`: what fp8 on the wire does to the model's output, measured in-process.

For each prompt, the real KV cache of the prompt goes through the real codec twice: raw (exact)
and fp8 (`--kv-wire-encoding fp8`: encode_chunk, then the decode's KvAssembler verifies and
dequantizes into the pool dtype). Greedy decoding then continues from each cache, as the decode
worker does, and the two continuations are compared: first-divergence position, % of identical
tokens, and the mean log-probability difference of the raw path's tokens (teacher-forced: a third
row decodes from the fp8 KV fed the raw row's tokens, so the figure does not depend on where the
texts diverged). The rows of several prompts run as one left-padded batch (raw and fp8 rows share
every computation but their KV, so any difference between them is the wire's). Also printed: KV
bytes moved per encoding and the codec's CPU time (encode at the prefill, verify + decode at the
receiver).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from services.bench.fp8_prompts import PROMPTS
from services.common.kv_codec import FP8_ENCODING, RAW_ENCODING, ChunkSpan, KvEnd, KvLayout, encode_chunk
from services.common.kv_assembly import AssemblyLimits, KvAssembler
from services.common.model_files import default_cache_dir, resolve_model_dir
from services.common.runtime import ModelRuntime
from services.gateway.text import PromptEncoder


@dataclass(frozen=True, slots=True)
class WireResult:
    kv: torch.Tensor  # [layers, 2, kv_heads, tokens, head_dim] as the receiver holds it
    bytes_moved: int  # chunk data + scales
    encode_seconds: float
    decode_seconds: float


@dataclass(frozen=True, slots=True)
class PromptResult:
    prompt_tokens: int
    first_divergence: int  # index of the first differing generated token; = tokens when none
    identical: int  # positions where both continuations hold the same token
    logprob_diffs: list[float]  # fp8 - raw, per teacher-forced position
    raw_tokens: list[int]


@dataclass(frozen=True, slots=True)
class AgreementReport:
    model: str
    dtype: str
    prompts: int
    tokens_per_prompt: int
    identical_token_percent: float
    identical_prompts: int
    first_divergence_mean: float
    first_divergence_median: float
    first_divergence_min: int
    mean_abs_logprob_diff: float
    mean_logprob_diff: float
    raw_bytes: int
    fp8_bytes: int
    raw_codec_seconds: float
    fp8_codec_seconds: float


class _Collect:
    """A KvTarget that fills one tensor (the receiver's pool stand-in for this in-process run)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.kv = torch.empty(shape, dtype=dtype)

    def store(self, span: ChunkSpan, tensor: torch.Tensor) -> None:
        self.kv[span.layer_start:span.layer_end, :, :, span.token_start:span.token_end] = tensor


def through_wire(runtime: ModelRuntime, kv: torch.Tensor, encoding: str, chunk_tokens: int,
                 chunk_layers: int) -> WireResult:
    """`kv` [layers, 2, heads, tokens, dim] encoded as the prefill does and verified and decoded as
    the decode worker does."""
    g, tokens = runtime.geometry, kv.shape[3]
    layout = KvLayout("bench", g.fingerprint, g.num_layers, g.num_kv_heads, g.head_dim, tokens, chunk_tokens,
                      chunk_layers, g.dtype, encoding)
    started = time.perf_counter()
    chunks = []
    for group in range(layout.layer_groups):
        layers = slice(group * chunk_layers, (group + 1) * chunk_layers)
        chunks += [encode_chunk(layout, i, kv[layers, 0], kv[layers, 1]) for i in layout.group_chunks(group)]
    encoded = time.perf_counter()
    target = _Collect(tuple(kv.shape), kv.dtype)
    assembler = KvAssembler("bench", g, tokens, AssemblyLimits(1 << 40), target)
    assembler.accept_layout(layout)
    for chunk in chunks:
        assembler.accept_chunk(chunk)
    assembler.finish(KvEnd("bench", layout.chunk_count, 0))
    return WireResult(target.kv, sum(len(c.data) + len(c.scales) for c in chunks), encoded - started,
                      time.perf_counter() - encoded)


@dataclass(frozen=True, slots=True)
class Prefilled:
    tokens: int
    first: int  # sampled (greedy) from the prefill's exact logits, as the prefill worker does
    raw: WireResult
    fp8: WireResult


def prefill(runtime: ModelRuntime, prompt: list[int], chunk_tokens: int, chunk_layers: int) -> Prefilled:
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    logits = runtime.prefill(prompt, lambda i, k, v: layers.__setitem__(i, (k.clone(), v.clone())))
    kv = torch.stack([torch.stack(layers[i]) for i in sorted(layers)])
    raw = through_wire(runtime, kv, RAW_ENCODING, chunk_tokens, chunk_layers)
    if not torch.equal(raw.kv, kv):
        raise RuntimeError("the raw encoding did not round-trip exactly")
    return Prefilled(len(prompt), int(logits.argmax()), raw, through_wire(runtime, kv, FP8_ENCODING, chunk_tokens,
                                                                         chunk_layers))


def padded_cache(runtime: ModelRuntime, kvs: list[torch.Tensor]) -> tuple[DynamicCache, torch.Tensor]:
    """One batch row per KV [layers, 2, heads, tokens, dim], left-padded to the longest; the mask
    marks each row's real positions (its keys already carry their true rotary positions)."""
    longest, (layers, _, heads, _, dim) = max(kv.shape[3] for kv in kvs), kvs[0].shape
    keys = torch.zeros((layers, len(kvs), heads, longest, dim), dtype=kvs[0].dtype)
    values, mask = torch.zeros_like(keys), torch.zeros((len(kvs), longest), dtype=torch.long)
    for row, kv in enumerate(kvs):
        start = longest - kv.shape[3]
        keys[:, row, :, start:], values[:, row, :, start:], mask[row, start:] = kv[:, 0], kv[:, 1], 1
    cache = runtime.new_cache()
    for layer in range(layers):
        cache.update(keys[layer].to(runtime.device), values[layer].to(runtime.device), layer)
    return cache, mask


@torch.inference_mode()
def continue_greedy(runtime: ModelRuntime, group: list[Prefilled], count: int) -> list[PromptResult]:
    """Greedy decoding of `count` tokens (the prefill's first included) for a group of prompts in
    one batch of three rows each: from the raw KV, from the fp8 KV, and from the fp8 KV fed the raw
    row's tokens (teacher forcing: the log-probability the fp8 KV gives the raw path's choice)."""
    n = len(group)
    cache, mask = padded_cache(runtime, [p.raw.kv for p in group] + [p.fp8.kv for p in group] * 2)
    lengths = torch.tensor([p.tokens for p in group] * 3)
    rows = [[p.first] for _ in range(3) for p in group]
    raw_logprobs: list[list[float]] = [[] for _ in group]
    forced_logprobs: list[list[float]] = [[] for _ in group]
    for step in range(count - 1):
        mask = torch.cat([mask, torch.ones((3 * n, 1), dtype=torch.long)], dim=1)
        logits = runtime.model(input_ids=torch.tensor([[row[-1]] for row in rows], device=runtime.device),
                               attention_mask=mask.to(runtime.device),
                               position_ids=(lengths + step)[:, None].to(runtime.device),
                               cache=cache, use_cache=True).logits[:, -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        chosen = logprobs.argmax(dim=-1).tolist()
        for r in range(n):
            rows[r].append(chosen[r])
            rows[n + r].append(chosen[n + r])
            rows[2 * n + r].append(chosen[r])  # teacher forcing: the raw row's token
            raw_logprobs[r].append(float(logprobs[r, chosen[r]]))
            forced_logprobs[r].append(float(logprobs[2 * n + r, chosen[r]]))
    results = []
    for r, prompt in enumerate(group):
        same = [a == b for a, b in zip(rows[r], rows[n + r], strict=True)]
        results.append(PromptResult(
            prompt.tokens, same.index(False) if False in same else count, sum(same),
            [f - raw for f, raw in zip(forced_logprobs[r], raw_logprobs[r], strict=True)], rows[r]))
    return results


def run(args: argparse.Namespace) -> AgreementReport:
    runtime = ModelRuntime(args.model, args.dtype, "cpu", default_cache_dir())
    encoder = PromptEncoder(resolve_model_dir(args.model, default_cache_dir()))
    prefilled = sorted((prefill(runtime, encoder.encode_text(text), args.chunk_tokens, args.chunk_layers)
                        for text in PROMPTS[: args.prompts]), key=lambda p: p.tokens)  # groups of like length
    results = []
    for start in range(0, len(prefilled), args.batch_prompts):
        results += continue_greedy(runtime, prefilled[start : start + args.batch_prompts], args.tokens)
    raws, fp8s = [p.raw for p in prefilled], [p.fp8 for p in prefilled]
    diffs = [d for r in results for d in r.logprob_diffs]
    divergences = [r.first_divergence for r in results]
    return AgreementReport(
        args.model, args.dtype, len(results), args.tokens,
        100 * sum(r.identical for r in results) / (len(results) * args.tokens),
        sum(r.first_divergence == args.tokens for r in results), statistics.mean(divergences),
        statistics.median(divergences), min(divergences), statistics.mean(abs(d) for d in diffs),
        statistics.mean(diffs), sum(w.bytes_moved for w in raws), sum(w.bytes_moved for w in fp8s),
        sum(w.encode_seconds + w.decode_seconds for w in raws), sum(w.encode_seconds + w.decode_seconds for w in fp8s))



def print_report(r: AgreementReport) -> None:
    print(f"fp8 on the wire vs raw: model {r.model} ({r.dtype}), {r.prompts} prompts x {r.tokens_per_prompt} "
          "greedy tokens")
    print(f"  identical tokens        {r.identical_token_percent:.1f}% ({r.identical_prompts}/{r.prompts} prompts "
          "identical throughout)")
    print(f"  first divergence        mean {r.first_divergence_mean:.1f}, median {r.first_divergence_median:.0f}, "
          f"min {r.first_divergence_min} (of {r.tokens_per_prompt}; {r.tokens_per_prompt} = none)")
    print(f"  log-prob of raw tokens  mean |fp8 - raw| {r.mean_abs_logprob_diff:.4f} nats, "
          f"mean fp8 - raw {r.mean_logprob_diff:+.4f} nats (teacher-forced)")
    print(f"  KV bytes moved          raw {r.raw_bytes:,}, fp8 {r.fp8_bytes:,} (data + scales; "
          f"{r.raw_bytes / r.fp8_bytes:.2f}x fewer)")
    print(f"  codec CPU time          raw {r.raw_codec_seconds * 1e3:.0f} ms, fp8 {r.fp8_codec_seconds * 1e3:.0f} ms "
          "(encode + verify + decode, all prompts)")


def main(argv: list[str] | None = None) -> AgreementReport:
    parser = argparse.ArgumentParser(prog="python -m services.bench.fp8_agreement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32", help="the workers' dtype (the decode pool's)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many (at most {len(PROMPTS)})")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt, the first included")
    parser.add_argument("--chunk-tokens", type=int, default=512, help="as the prefill's --kv-chunk-tokens")
    parser.add_argument("--chunk-layers", type=int, default=4, help="as the prefill's --kv-chunk-layers")
    parser.add_argument("--batch-prompts", type=int, default=10, help="prompts decoded together (3 rows each)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    report = run(args)
    print(json.dumps(asdict(report), indent=2)) if args.json else print_report(report)
    return report


if __name__ == "__main__":
    main()
