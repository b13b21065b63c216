"""What the prefill's prefix cache changes, measured in-process on the real model:

1. Agreement: greedy tokens of multi-turn conversations, turn 2 computed whole (cache off) vs on the
   KV of turn 1's full prompt blocks (cache on, as the prefill reuses them), over many conversations:
   identical tokens, first divergence, identical conversations.
2. Cost on a workload without any repetition: hashing, lookup and storing the blocks of a prompt,
   next to its forward pass.

    python -m services.bench.prefix [--conversations 50] [--tokens 32]
"""

from __future__ import annotations

import argparse
import time
from typing import Any, cast

import torch
from prometheus_client import CollectorRegistry

from services.common.model_files import default_cache_dir
from services.common.runtime import ModelRuntime
from services.gateway.text import PromptEncoder
from services.prefill.prefix_cache import PrefixCache, PrefixCacheMetrics, PrefixHit

TOPICS = ["the solar system", "bread baking", "the French revolution", "chess openings", "volcanoes",
          "the human heart", "jazz music", "electric cars", "honey bees", "the Roman roads"]
FIRST = ["Tell me one surprising fact about {}.", "Explain {} to a child in two sentences.",
         "What is the most common mistake people make about {}?", "Give me a short history of {}.",
         "Why does {} matter today?"]
SYSTEM = ("You are a friendly and knowledgeable assistant for a public library. Answer in a few clear sentences, "
          "prefer well-established facts, say so when you are unsure, avoid jargon unless the reader asks for it, "
          "and suggest one book or article for further reading when it helps. Keep a warm, patient tone.")
SECOND = ["Can you say more?", "Why is that?", "Give me an example.", "Summarize that in one line.",
          "What should I read next?"]


def conversations(count: int) -> list[tuple[str, str]]:
    pairs = [(first.format(topic), second) for topic in TOPICS for first in FIRST for second in SECOND]
    return pairs[:: max(1, len(pairs) // count)][:count]


@torch.inference_mode()
def generate(runtime: ModelRuntime, ids: list[int], tokens: int, past: object | None = None) -> list[int]:
    tensor = torch.tensor([ids])
    model: Any = runtime.model  # a Hugging Face model: generate comes from transformers
    out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=tokens,
                         do_sample=False, past_key_values=past)
    return out[0, len(ids) :].tolist()


@torch.inference_mode()
def cached_prefix(runtime: ModelRuntime, earlier: list[int], block_size: int) -> object:
    """The KV the prefix cache holds after `earlier` was prefilled: its full blocks but the last token."""
    cache = runtime.new_cache()
    runtime.prefill(earlier, lambda *_: None, cache)
    keep = (len(earlier) - 1) // block_size * block_size
    cache.crop(keep - len(earlier))  # (this transformers crops by a negative count of tokens to drop)
    return cache


def agreement(runtime: ModelRuntime, encoder: PromptEncoder, count: int, tokens: int, block_size: int) -> None:
    same = total = whole = 0
    divergences: list[int] = []
    reused = 0
    for first, second in conversations(count):
        turn = [("system", SYSTEM), ("user", first)]
        turn_ids = encoder.encode_chat(turn)
        # decode of one sequence of ids is one string
        answer = cast(str, encoder.tokenizer.decode(generate(runtime, turn_ids, 24), skip_special_tokens=True))
        next_ids = encoder.encode_chat([*turn, ("assistant", answer), ("user", second)])
        past = cached_prefix(runtime, turn_ids, block_size)
        reused += past.get_seq_length()  # type: ignore[attr-defined]
        off, on = generate(runtime, next_ids, tokens), generate(runtime, next_ids, tokens, past)
        matches = [a == b for a, b in zip(off, on, strict=True)]
        same, total, whole = same + sum(matches), total + len(matches), whole + all(matches)
        if not all(matches):
            divergences.append(matches.index(False))
    print(f"agreement over {count} two-turn conversations x {tokens} greedy tokens (turn 2 on turn 1's cached "
          f"blocks, {reused / count:.0f} prompt tokens reused on average):")
    print(f"  identical tokens {100 * same / total:.2f}%   identical conversations {whole}/{count}   "
          f"first divergences at {sorted(divergences) or 'none'}")


def cost(runtime: ModelRuntime, block_size: int) -> None:
    geometry = runtime.geometry
    for length in (512, 2048):
        ids = torch.randint(100, geometry.vocab_size, (length,)).tolist()
        layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        started = time.perf_counter()
        runtime.prefill(ids, lambda i, k, v: layers.__setitem__(i, (k, v)))
        forward = time.perf_counter() - started
        cache = PrefixCache(2**40, block_size, geometry.fingerprint, geometry.kv_bytes_per_token * block_size,
                            PrefixCacheMetrics.create(CollectorRegistry()))
        started = time.perf_counter()
        hit: PrefixHit = cache.lookup(ids, "")
        wanted = cache.wanted(hit)
        rows = slice(*cache.rows(wanted))  # type: ignore[misc]
        recorded = {i: (keys[:, rows].clone(), values[:, rows].clone()) for i, (keys, values) in layers.items()}
        cache.insert(cache.make_blocks(hit, wanted, recorded), hit.keys)
        stored = time.perf_counter() - started
        print(f"  {length}-token prompt, no repetition: forward {forward * 1e3:.0f} ms; lookup + store of "
              f"{cache.blocks} blocks ({cache.bytes / 1e6:.0f} MB) {stored * 1e3:.1f} ms "
              f"({100 * stored / forward:.1f}% of the forward, after the first token)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    runtime = ModelRuntime(args.model, "float32", "cpu", default_cache_dir())
    encoder = PromptEncoder(runtime.model_dir)
    agreement(runtime, encoder, args.conversations, args.tokens, args.block_size)
    cost(runtime, args.block_size)


if __name__ == "__main__":
    main()
