"""Structured output: a request's constraint (JSON object, JSON schema, regex, or one of a list of
choices) as a grammar that masks the logits of every token it does not allow.

The grammar engine is llguidance (PyPI; a Rust library, no torch dependency). Measured on the
2-core development machine for a 29-token JSON-schema output (`python -m services.bench.grammar`,
README *Structured output*): llguidance 11-18 us median, 38-52 us p90 per token mask, 1-4 ms to
compile a schema; xgrammar 2 us median, 10 us p90, 4-6 ms to compile, but it pulls triton and a TVM
runtime (hundreds of MB) into every worker image. Both are under 0.1% of a decode step here.

The prefill masks the first token, the decode every later one (a failover replays the completion so
far into a fresh matcher first). Masks apply after the logit controls and before temperature, so
greedy decoding takes the most likely token the grammar allows; log-probabilities stay those of the
raw logits. A grammar that has completed (llguidance stops it) ends the completion with "stop".
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from llguidance import LLMatcher, LLTokenizer
from llguidance.hf import from_tokenizer
from transformers import AutoTokenizer

from services.common.errors import InternalFailure, InvalidRequest

log = logging.getLogger(__name__)

KINDS = ("json_object", "json_schema", "regex", "choice")
MAX_SPEC_BYTES = 64 * 1024  # a schema or regex
MAX_CHOICES = 256


@dataclass(frozen=True, slots=True)
class Constraint:
    """What the output must match; validated (the grammar compiles) when made."""

    kind: str  # one of KINDS
    spec: str = ""  # json_schema: the schema as JSON text; regex: the pattern
    choices: tuple[str, ...] = ()  # choice: the output is exactly one of these

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequest(f"structured_output must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if len(self.spec.encode()) > MAX_SPEC_BYTES:
            raise InvalidRequest(f"{self.kind} is over {MAX_SPEC_BYTES} bytes")
        if self.kind == "choice" and not (0 < len(self.choices) <= MAX_CHOICES and all(self.choices)):
            raise InvalidRequest(f"choice needs 1-{MAX_CHOICES} non-empty strings")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.spec)
            except ValueError as error:
                raise InvalidRequest(f"json_schema is not valid JSON: {error}") from None
            if not isinstance(schema, dict | bool):
                raise InvalidRequest("json_schema must be a JSON object")

    def check(self) -> None:
        """Raise InvalidRequest if the grammar does not compile. Blocking (a big schema takes tens of
        ms): the gateway calls it off the event loop; the workers' `GrammarEngine.start` checks too."""
        problem = _grammar_problem(self)
        if problem:
            raise InvalidRequest(f"{self.kind} cannot be used: {problem}")

    def grammar(self) -> str:
        """llguidance's grammar text for this constraint."""
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema('{"type": "object"}')
        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.spec)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.spec)
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(choice) for choice in self.choices))


@functools.lru_cache(maxsize=64)  # a request's prompts share one constraint; clients repeat schemas
def _grammar_problem(constraint: Constraint) -> str:
    """The first line of what is wrong with the constraint's grammar; empty when it compiles."""
    try:
        problem = LLMatcher.validate_grammar(constraint.grammar())
    except (ValueError, RuntimeError) as error:
        problem = str(error)
    return problem.strip().splitlines()[0] if problem.strip() else ""


class GrammarState:
    """One request's position in its grammar. Masks are computed on the model thread and tokens
    consumed on the event loop, never both at once for one request (the scheduler orders them)."""

    def __init__(self, matcher: LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._words = numpy.zeros((vocab_size + 31) // 32, dtype=numpy.int32)

    def allowed(self) -> torch.Tensor:
        """Which tokens may come next: bool [vocab_size]."""
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        bits = numpy.unpackbits(self._words.view(numpy.uint8), bitorder="little")[: self._vocab_size]
        return torch.from_numpy(bits.astype(bool))

    def consume(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise InternalFailure(f"token {token_id} broke the output's grammar: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing more may follow."""
        return self._matcher.is_stopped()

    def fork(self) -> GrammarState:
        """An independent copy at the same position (another choice of the same request)."""
        return GrammarState(self._matcher.deep_copy(), self._vocab_size)


class GrammarEngine:
    """A worker's grammars: the tokenizer as llguidance sees it (built once, ~0.3 s; `warm` at start)
    and a fresh matcher per request."""

    def __init__(self, model_dir: Path, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self._model_dir = model_dir
        self._vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._tokenizer: LLTokenizer | None = None
        self._unavailable = ""  # why this model's tokenizer cannot drive a grammar, if it cannot
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Build the tokenizer's grammar view now. A tokenizer llguidance cannot use (not a fast
        tokenizer, more ids than the model's vocabulary) leaves the worker serving everything else."""
        try:
            self._llg_tokenizer()
        except InvalidRequest as error:
            log.warning("%s", error)

    def _llg_tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._tokenizer is None and not self._unavailable:
                try:
                    hf = AutoTokenizer.from_pretrained(self._model_dir)
                    # A slow tokenizer is refused by from_tokenizer itself (ValueError, handled below).
                    self._tokenizer = from_tokenizer(hf, n_vocab=self._vocab_size,  # type: ignore[arg-type]
                                                     eos_token=self._eos or None)
                except (ValueError, RuntimeError, OSError) as error:
                    self._unavailable = f"{type(error).__name__}: {error}"
            if self._tokenizer is None:
                raise InvalidRequest(f"structured output is unavailable with this model: {self._unavailable}")
            return self._tokenizer

    def start(self, constraint: Constraint, completion_so_far: Sequence[int] = ()) -> GrammarState:
        """A matcher at the start of the output, advanced past tokens already generated (a failover).
        Blocking (a big schema takes milliseconds): call it off the event loop."""
        try:
            matcher = LLMatcher(self._llg_tokenizer(), constraint.grammar())
        except (ValueError, RuntimeError) as error:
            raise InvalidRequest(f"{constraint.kind} cannot be used: {error}") from None
        if matcher.is_error():
            raise InvalidRequest(f"{constraint.kind} cannot be used: {matcher.get_error()}")
        state = GrammarState(matcher, self._vocab_size)
        for index, token_id in enumerate(completion_so_far):
            try:
                state.consume(token_id)
            except InternalFailure:
                raise InvalidRequest(f"completion token {index} ({token_id}) breaks the {constraint.kind}") from None
        return state
