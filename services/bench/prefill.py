"""`python -m services.bench.prefill`: prompt throughput of the prefill's forward pass against Hugging
Face's own forward on the same prompt, in one process, side by side.

Rows, per prompt length (best of --repeats, torch threads as `make up` gives the prefill worker
unless --threads says otherwise):
  HF forward          model(input_ids, logits_to_keep=1): the reference
  prefill             ModelRuntime.prefill, the worker's forward: each layer's KV handed out as the
                      layer finishes (here to a no-op; the worker queues it for the chunk pump)
  prefill chunked     the same prompt in forward chunks of --chunk tokens over one cache, as the
                      worker runs prompts longer than --prefill-chunk-tokens
  prefill scored      prefill_scored: the prompt's log-probabilities too (echo / prompt_logprobs)
Each row prints tokens/s and its ratio to HF forward.
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


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def rows(runtime: ModelRuntime, length: int, chunk: int, repeats: int) -> list[tuple[str, float]]:
    ids = [(7 * i) % 40_000 + 100 for i in range(length)]
    model = runtime.model

    def hf_forward() -> None:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]), logits_to_keep=1)

    def chunked() -> None:
        cache = runtime.new_cache()
        for start in range(0, length, chunk):
            runtime.prefill(ids[start : start + chunk], lambda *_: None, cache)

    measured = [("HF forward", best_seconds(hf_forward, repeats)),
                ("prefill", best_seconds(lambda: runtime.prefill(ids, lambda *_: None), repeats)),
                (f"prefill chunked {chunk}", best_seconds(chunked, repeats)),
                ("prefill scored", best_seconds(lambda: runtime.prefill_scored(ids, lambda *_: None, ids[1:], 1),
                                                repeats))]
    return measured


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--chunk", type=int, default=512, help="forward chunk of the chunked row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core this process may use)")
    parser.add_argument("--model", default="default")
    args = parser.parse_args(argv)
    placement.apply("", args.threads)
    runtime = ModelRuntime(args.model, "float32", "cpu", Path(default_cache_dir()))
    runtime.prefill([1, 2, 3, 4], lambda *_: None)  # warm-up
    print(f"prefill forward vs Hugging Face forward: model {args.model} (float32), "  # noqa: T201
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    for length in args.lengths:
        measured = rows(runtime, length, args.chunk, args.repeats)
        reference = measured[0][1]
        for name, seconds in measured:
            print(f"  {length:5d} tokens  {name:22} {seconds:7.3f} s  {length / seconds:8.0f} tokens/s"  # noqa: T201
                  f"  {reference / seconds:5.2f}x HF")


if __name__ == "__main__":
    main()
