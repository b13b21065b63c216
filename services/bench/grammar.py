"""`python -m services.bench.grammar`: what a structured-output grammar costs per token on this CPU.

Feeds the tokens of a valid 29-token JSON output through a JSON-schema grammar of the default
model's tokenizer, computing the allowed-token mask before each token, as the decode step does:
prints the compile time and the per-token mask time (median, p90, max) for llguidance (what the
workers use) and, when it is installed in the same environment, xgrammar, side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

from transformers import AutoTokenizer

from services.common.grammar import Constraint, GrammarEngine
from services.common.model_files import default_cache_dir, resolve_model_dir
from services.common.runtime import read_geometry

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
OUTPUT = {"name": "Alice Smith", "age": 42, "tags": ["engineer", "runner", "reader"]}


def _figures(name: str, compile_seconds: float, masks: list[float]) -> str:
    ordered = sorted(masks)
    median = statistics.median(masks)
    return (f"  {name:11} compile {compile_seconds * 1e3:6.1f} ms   mask median {median * 1e6:6.1f} us"
            f"  p90 {ordered[int(0.9 * len(ordered))] * 1e6:6.1f} us  max {ordered[-1] * 1e6:7.1f} us")


def _timed(step: Callable[[], object]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def llguidance_row(engine: GrammarEngine, ids: Sequence[int], repeats: int) -> str:
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    compile_seconds = _timed(lambda: engine.start(constraint))
    masks = []
    for _ in range(repeats):
        state = engine.start(constraint)
        for token in ids:
            masks.append(_timed(state.allowed))
            state.consume(token)
    return _figures("llguidance", compile_seconds, masks)


def xgrammar_row(tokenizer: object, vocab_size: int, ids: Sequence[int], repeats: int) -> str:
    try:
        import xgrammar  # noqa: PLC0415 - optional: only for this comparison
    except ImportError:
        return "  xgrammar    not installed (pip install xgrammar into this environment to compare)"
    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size))
    started = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_seconds = time.perf_counter() - started
    masks = []
    for _ in range(repeats):
        matcher, bitmask = xgrammar.GrammarMatcher(compiled), xgrammar.allocate_token_bitmask(1, vocab_size)
        for token in ids:
            masks.append(_timed(lambda: matcher.fill_next_token_bitmask(bitmask)))  # noqa: B023 - called at once
            matcher.accept_token(token)
    return _figures("xgrammar", compile_seconds, masks)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="times the output is fed through")
    args = parser.parse_args(argv)
    model_dir = resolve_model_dir("default", default_cache_dir())
    geometry = read_geometry(model_dir, "default", "float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.encode(json.dumps(OUTPUT)) + sorted(geometry.eos_token_ids)[:1]
    engine = GrammarEngine(model_dir, geometry.vocab_size, geometry.eos_token_ids)
    engine.warm()
    print(f"structured output: a JSON schema, {len(ids)} tokens x {args.repeats}, per-token mask")  # noqa: T201
    print(llguidance_row(engine, ids, args.repeats))  # noqa: T201
    print(xgrammar_row(tokenizer, geometry.vocab_size, ids, args.repeats))  # noqa: T201


if __name__ == "__main__":
    main()
