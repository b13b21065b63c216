"""`python -m services.bench profile`: measure prefill tokens/s against prompt length and decode
step time against batch size for the served model on this machine, then advise worker counts for
a described workload (see services.bench.advisor for the model)."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

import torch

from services.bench.advisor import Profile, Workload, advise
from services.common.model_files import default_cache_dir
from services.common.runtime import ModelRuntime
from services.common.packed_weights import PackedWeights
from services.decode import exact_gemv, one_stream as one_stream_path, panel_products, prompt_products
from services.decode.blocks import BlockManager
from services.decode.gemv_helpers import SETTINGS_HELP, check_setting, helper_cores
from services.decode.pool import BlockPool, PoolConfig
from services.decode.native_attention import MODES, NativeAttention
from services.decode.paged_runner import PagedRunner, StepSlot

TRANSFER_BYTES_PER_S = 0.5e9  # measured by `make bench-transfer` on this machine (gRPC stream)


def measure(model: str, prompt_lengths: list[int], batches: list[int], context: int,
            paged_attention: str = "auto", gemv: str = "auto", *, one_stream: bool = True,
            batched_products: str = "auto", prefill_products: str = "auto", gemv_helpers: str = "off") -> Profile:
    runtime = ModelRuntime(model, "float32", "auto", default_cache_dir())
    products = panel_products.choose(runtime.model, runtime.device, default_cache_dir(), batched_products)
    packed = PackedWeights.build(runtime.model, runtime.device, "batched", products)
    # after packing, as the decode worker does (the process is not placed: "auto" takes no core)
    exact_gemv.install(runtime.model, default_cache_dir(), gemv, helper_cores(gemv_helpers, frozenset()), packed)
    # then the prompts' products, as the decode worker does: the prefill worker's are the same kernel
    prompt_products.install(runtime.model, runtime.device, default_cache_dir(), prefill_products, packed,
                            on_decode=True)
    prefill: dict[int, float] = {}
    for length in prompt_lengths:
        ids = torch.randint(10, 1000, (length,)).tolist()
        runtime.prefill(ids[:8], lambda *_: None)
        started = time.perf_counter()
        runtime.prefill(ids, lambda *_: None)
        prefill[length] = length / (time.perf_counter() - started)
    config = PoolConfig(max(batches) * (context // 16 + 2), 16)
    pool, blocks = BlockPool(config, runtime.geometry, runtime.device), BlockManager(config)
    runner = PagedRunner(runtime, pool, packed=packed,
                         attention=NativeAttention.build(runtime, default_cache_dir(), paged_attention),
                         one_stream=one_stream_path.for_model(runtime.model, "" if one_stream else "--no-one-stream"))
    steps: dict[int, float] = {}
    for batch in batches:
        owners = [f"b{batch}-{i}" for i in range(batch)]
        for owner in owners:
            blocks.allocate(owner, context + 1)
        slots = [StepSlot(blocks.table(owner), context, 100 + i) for i, owner in enumerate(owners)]
        runner.step(slots)
        started = time.perf_counter()
        for _ in range(3):
            runner.step(slots)
        steps[batch] = (time.perf_counter() - started) / 3
        for owner in owners:
            blocks.free(owner)
    return Profile(prefill, steps, runtime.geometry.kv_bytes_per_token, TRANSFER_BYTES_PER_S)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.bench profile", description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[64, 256, 1024, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--context", type=int, default=256, help="KV length of each sequence while timing decode")
    parser.add_argument("--paged-attention", choices=MODES, default="auto",
                        help="how batched steps attend, as the decode worker's setting of that name")
    parser.add_argument("--gemv", choices=exact_gemv.MODES, default="auto",
                        help="a batch of one's products, as the decode worker's setting of that name")
    parser.add_argument("--batched-products", choices=panel_products.MODES, default="auto",
                        help="a batched step's products, as the decode worker's setting of that name")
    parser.add_argument("--prefill-products", choices=prompt_products.MODES, default="auto",
                        help="a prompt's products, as the workers' setting of that name")
    parser.add_argument("--one-stream", action=argparse.BooleanOptionalAction, default=True,
                        help="a batch of one on the one-stream path, as the decode worker's setting of that name")
    parser.add_argument("--gemv-helpers", default="off", help=f"as the decode worker's setting of that name: "
                        f"{SETTINGS_HELP}; auto takes none here (this process has no placement)")
    parser.add_argument("--rate", type=float, default=1.0, help="workload: requests/s")
    parser.add_argument("--prompt-tokens", type=float, default=1024)
    parser.add_argument("--output-tokens", type=float, default=128)
    parser.add_argument("--slo-ttft-ms", type=float, default=2000)
    parser.add_argument("--slo-tpot-ms", type=float, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        check_setting(args.gemv_helpers)
    except ValueError as error:
        parser.error(str(error))
    profile = measure(args.model, args.prompt_lengths, args.batches, args.context, args.paged_attention,
                      args.gemv, one_stream=args.one_stream, batched_products=args.batched_products,
                      prefill_products=args.prefill_products, gemv_helpers=args.gemv_helpers)
    advice = advise(profile, Workload(args.rate, args.prompt_tokens, args.output_tokens, args.slo_ttft_ms / 1000,
                                      args.slo_tpot_ms / 1000))
    if args.json:
        print(json.dumps({"profile": asdict(profile), "advice": asdict(advice)}, indent=2))
        return
    print("prefill tokens/s by prompt length: " + ", ".join(f"{k}: {v:.0f}" for k, v in
                                                              profile.prefill_tokens_per_s.items()))
    print("decode step ms by batch size:      " + ", ".join(f"{k}: {v * 1e3:.0f}" for k, v in
                                                              profile.decode_step_seconds.items()))
    print(f"workload: {args.rate:g} req/s, prompt {args.prompt_tokens:g}, output {args.output_tokens:g} tokens, "
          f"SLO TTFT {args.slo_ttft_ms:g} ms / TPOT {args.slo_tpot_ms:g} ms")
    print(f"advice: {advice.prefill_workers} prefill + {advice.decode_workers} decode workers "
          f"(decode batch up to {advice.decode_batch}); disaggregate: {advice.disaggregate}")
    for reason in advice.reasons:
        print(f"  - {reason}")
