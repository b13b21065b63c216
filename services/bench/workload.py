"""What a benchmark sends: prompts and output lengths (fixed, uniform, or from a JSONL file) and
when (fixed concurrency, or Poisson arrivals at a rate), all repeatable from a seed. A shared-prefix
workload puts one of a few long 'system prompts' in front of every prompt, and a multi-turn one
resends each conversation with its next turn (real traffic repeats itself); a salted run gives
every request its own cache salt, so no prefix cache can serve it."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

_WORDS = ("river", "mountain", "quiet", "engine", "garden", "signal", "paper", "window", "orbit", "honey",
          "silver", "market", "forest", "letter", "planet", "motion", "candle", "bridge", "winter", "story")


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt: str
    max_tokens: int
    arrival: float  # seconds after the start (0 for every request under fixed concurrency)
    cache_salt: str = ""  # a salted run: a prefix cache shares nothing between requests


def parse_length(spec: str) -> tuple[int, int]:
    """'128' (fixed) or '64:256' (uniform, inclusive)."""
    low, _, high = spec.partition(":")
    bounds = (int(low), int(high or low))
    if bounds[0] <= 0 or bounds[1] < bounds[0]:
        raise ValueError(f"length {spec!r}: use N or LOW:HIGH with 0 < LOW <= HIGH")
    return bounds


def synthetic_prompt(rng: random.Random, words: int) -> str:
    """About one token per word for common tokenizers."""
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def parse_shared_prefix(spec: str) -> tuple[int, int]:
    """'GROUPS:TOKENS': that many distinct prefixes of about that many tokens."""
    groups, _, tokens = spec.partition(":")
    try:
        shape = (int(groups), int(tokens))
    except ValueError:
        shape = (0, 0)
    if min(shape) <= 0:
        raise ValueError(f"shared prefix {spec!r}: use GROUPS:TOKENS, both > 0")
    return shape


def build(num_requests: int, prompt_tokens: str, output_tokens: str, rate: float | None, seed: int,
          prompts_file: Path | None = None, shared_prefix: tuple[int, int] | None = None,
          salted: bool = False, turns: int = 1) -> list[BenchRequest]:
    """The requests; with `shared_prefix` (groups, tokens) conversation c starts with prefix
    c % groups, and --prompt-tokens is the length of each user turn after it. With `turns` > 1 the
    requests are conversations: request i is turn i // C of conversation i % C (C conversations),
    and resends the conversation so far (earlier user turns, each followed by a synthetic reply as
    long as that turn's output) before its own user turn; a turn is sent after every conversation's
    turn before it (as a chat client sends turn N+1 after reading turn N)."""
    rng = random.Random(seed)
    prefixes = [synthetic_prompt(random.Random(seed * 1000 + group), shared_prefix[1]) + "\n"
                for group in range(shared_prefix[0])] if shared_prefix else []
    prompt_range, output_range = parse_length(prompt_tokens), parse_length(output_tokens)
    records = [json.loads(line) for line in prompts_file.read_text().splitlines() if line.strip()] \
        if prompts_file else []
    requests, clock = [], 0.0
    conversations = -(-num_requests // turns)
    history = [""] * conversations  # each conversation so far
    for index in range(num_requests):
        conversation = index % conversations
        if records:
            record = records[index % len(records)]
            prompt, max_tokens = record["prompt"], int(record.get("max_tokens", rng.randint(*output_range)))
        else:
            prompt, max_tokens = synthetic_prompt(rng, rng.randint(*prompt_range)), rng.randint(*output_range)
        prompt = history[conversation] + prompt
        if turns > 1:
            history[conversation] = f"{prompt}\n{synthetic_prompt(rng, max_tokens)}\n"
        if prefixes:
            prompt = prefixes[conversation % len(prefixes)] + prompt
        if rate:
            clock += rng.expovariate(rate)
        salt = f"bench-{seed}-{index}-{rng.getrandbits(32):08x}" if salted else ""
        requests.append(BenchRequest(prompt, max_tokens, clock if rate else 0.0, salt))
    return requests
