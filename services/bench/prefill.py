"""`python -m services.bench.prefill`: prompt throughput of the prefill's forward pass against Hugging
Face's own forward on the same prompt, in one process, side by side.

Rows, per prompt length (best of --repeats, torch threads as `make up` gives the prefill worker
unless --threads says otherwise):
  HF forward          model(input_ids, logits_to_keep=1): the reference
  prefill, torch products  ModelRuntime.prefill with torch's matrix products (--prefill-products torch)
  prefill             ModelRuntime.prefill, the worker's forward with --products (default auto, as the
                      worker's): each layer's KV handed out as the layer finishes (here to a no-op;
                      the worker queues it for the chunk pump)
  prefill chunked     the same prompt in forward chunks of --chunk tokens over one cache, as the
                      worker runs prompts longer than --prefill-chunk-tokens
  prefill scored      prefill_scored: the prompt's log-probabilities too (echo / prompt_logprobs)
Each row prints tokens/s and its ratio to HF forward, and each length whether the prefill's last
logits are bit-identical to those of torch's products.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from services.common import placement
from services.common.model_files import default_cache_dir
from services.common.runtime import ModelRuntime
from services.decode import prompt_products


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def prompt(length: int) -> list[int]:
    return [(7 * i) % 40_000 + 100 for i in range(length)]


def reference_rows(runtime: ModelRuntime, length: int, repeats: int) -> list[tuple[str, float]]:
    """HF forward and the prefill with torch's products: measured before the kernel is installed."""
    ids, model = prompt(length), runtime.model

    def hf_forward() -> None:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]), logits_to_keep=1)

    return [("HF forward", best_seconds(hf_forward, repeats)),
            ("prefill, torch products", best_seconds(lambda: runtime.prefill(ids, lambda *_: None), repeats))]


def prefill_rows(runtime: ModelRuntime, length: int, chunk: int, repeats: int) -> list[tuple[str, float]]:
    ids = prompt(length)

    def chunked() -> None:
        cache = runtime.new_cache()
        for start in range(0, length, chunk):
            runtime.prefill(ids[start : start + chunk], lambda *_: None, cache)

    return [("prefill", best_seconds(lambda: runtime.prefill(ids, lambda *_: None), repeats)),
            (f"prefill chunked {chunk}", best_seconds(chunked, repeats)),
            ("prefill scored", best_seconds(lambda: runtime.prefill_scored(ids, lambda *_: None, ids[1:], 1),
                                            repeats))]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--chunk", type=int, default=512, help="forward chunk of the chunked row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core this process may use)")
    parser.add_argument("--products", choices=prompt_products.MODES, default="auto",
                        help="the prefill's matrix products, as the worker's --prefill-products")
    parser.add_argument("--model", default="default")
    args = parser.parse_args(argv)
    placement.apply("", args.threads)
    runtime = ModelRuntime(args.model, "float32", "cpu", Path(default_cache_dir()))
    runtime.prefill([1, 2, 3, 4], lambda *_: None)  # warm-up
    references = {length: reference_rows(runtime, length, args.repeats) for length in args.lengths}
    logits = {length: runtime.prefill(prompt(length), lambda *_: None) for length in args.lengths}
    replaced = prompt_products.install(runtime.model, runtime.device, Path(default_cache_dir()), args.products)
    print(f"prefill forward vs Hugging Face forward: model {args.model} (float32), "  # noqa: T201
          f"{torch.get_num_threads()} threads, best of {args.repeats}; --products {args.products}: the panel "
          f"kernel on {replaced} linear layers")
    for length in args.lengths:
        measured = references[length] + prefill_rows(runtime, length, args.chunk, args.repeats)
        same = torch.equal(runtime.prefill(prompt(length), lambda *_: None).view(torch.int32),
                           logits[length].view(torch.int32))
        reference = measured[0][1]
        for name, seconds in measured:
            print(f"  {length:5d} tokens  {name:24} {seconds:7.3f} s  {length / seconds:8.0f} tokens/s"  # noqa: T201
                  f"  {reference / seconds:5.2f}x HF")
        print(f"  {length:5d} tokens  last logits bit-identical to torch products': {same}")  # noqa: T201


if __name__ == "__main__":
    main()
