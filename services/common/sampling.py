"""Choosing the next token from logits: the request's logit controls (penalties, logit bias,
min_tokens: services.common.logit_controls), then greedy, or temperature, top-k, top-p, min-p, seeded.

The token at completion position i is drawn from a generator seeded by (seed, i), so the prefill
(position 0) and the decode (positions 1..) sample consistently, on any worker.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from services.common.errors import InternalFailure, InvalidRequest
from services.common.grammar import Constraint
from services.common.logit_controls import TokenContext, apply_controls, check_controls
from services.common.logprobs import check_top_n
from services.common.pb import common_pb2
from services.common.validation import check_temperature

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) pairs apart
_SEED_MASK = (1 << 63) - 1
MAX_CHOICES = 16  # most choices (n, best_of) one request may ask for


@dataclass(frozen=True, slots=True)
class Sampling:
    """Validated sampling settings of one request."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids ascending
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # alternatives with each token's log-probability; None: none at all
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (computed by the prefill)
    constraint: Constraint | None = None  # structured output: the grammar the output must match
    n: int = 1  # choices generated from the prompt; choice c samples with seed + c

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be > 0, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must not be empty")
        check_controls(self.presence_penalty, self.frequency_penalty, self.repetition_penalty, self.min_p,
                       self.logit_bias, self.stop_token_ids)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        check_top_n("logprobs", self.logprobs)
        check_top_n("prompt_logprobs", self.prompt_logprobs)
        if not 1 <= self.n <= MAX_CHOICES:
            raise InvalidRequest(f"n must be in [1, {MAX_CHOICES}], got {self.n}")

    def for_choice(self, choice: int) -> Sampling:
        """How choice `choice` of the request samples: alone, with its own seed."""
        return replace(self, seed=(self.seed + choice) % (1 << 64), n=1)

    @property
    def reshapes_logits(self) -> bool:
        """Whether any logit control is on (each costs a little per token)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias or self.min_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: torch.Tensor, params: Sampling, position: int, context: TokenContext | None = None,
           allowed: torch.Tensor | None = None) -> int:
    """The token at completion position `position` given its 1-D float32 logits, for the logit
    controls the row's tokens so far, and for structured output the tokens its grammar allows (bool).
    Logits holding NaN or +inf (a broken model or KV) raise InternalFailure instead of yielding an
    arbitrary token."""
    peak = logits.max()
    if bool(torch.isnan(logits).any()) or not bool(torch.isfinite(peak)):
        raise InternalFailure("the model produced non-finite logits")
    raw = logits
    if params.reshapes_logits:
        logits = apply_controls(logits, params, position, context or TokenContext((), 0, frozenset()))
        peak = logits.max()
    if allowed is not None:
        if not bool(allowed.any()):
            raise InternalFailure("the output's grammar allows no token")
        logits = logits.masked_fill(~allowed[: logits.numel()], float("-inf"))
        peak = logits.max()
        if not bool(torch.isfinite(peak)):  # min_tokens banned the only tokens allowed (EOS): the grammar wins
            logits = raw.masked_fill(~allowed[: raw.numel()], float("-inf"))
            peak = logits.max()
    if params.greedy:
        return int(torch.argmax(logits))
    # Shifted so the best score is 0: dividing by any allowed temperature cannot overflow.
    scores = (logits.float() - peak) / params.temperature
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= params.top_p  # keep the first token
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    generator = torch.Generator().manual_seed((params.seed * _SEED_MIX + position) & _SEED_MASK)
    return int(torch.multinomial(probs, 1, generator=generator))


def sampling_from_pb(params: common_pb2.SamplingParams, default_max_tokens: int) -> Sampling:
    """Domain sampling settings from the wire; unset fields take their documented defaults."""
    return Sampling(
        temperature=params.temperature if params.HasField("temperature") else 1.0,
        top_p=params.top_p if params.HasField("top_p") else 1.0,
        top_k=params.top_k,
        seed=params.seed if params.HasField("seed") else 0,
        max_tokens=params.max_tokens if params.HasField("max_tokens") else default_max_tokens,
        stop=tuple(params.stop),
        ignore_eos=params.ignore_eos,
        presence_penalty=params.presence_penalty if params.HasField("presence_penalty") else 0.0,
        frequency_penalty=params.frequency_penalty if params.HasField("frequency_penalty") else 0.0,
        repetition_penalty=params.repetition_penalty if params.HasField("repetition_penalty") else 1.0,
        min_p=params.min_p if params.HasField("min_p") else 0.0,
        logit_bias=tuple(sorted(params.logit_bias.items())),
        min_tokens=params.min_tokens,
        stop_token_ids=tuple(params.stop_token_ids),
        logprobs=params.logprobs if params.HasField("logprobs") else None,
        prompt_logprobs=params.prompt_logprobs if params.HasField("prompt_logprobs") else None,
        constraint=constraint_from_pb(params.structured_output) if params.HasField("structured_output") else None,
        n=params.n if params.HasField("n") else 1,
    )


def constraint_from_pb(message: common_pb2.StructuredOutput) -> Constraint:
    kind = message.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest("structured_output is set but names no constraint")
    if kind == "json_object" and not message.json_object:
        raise InvalidRequest("structured_output.json_object must be true when set")
    return Constraint(kind, message.regex if kind == "regex" else message.json_schema,
                      tuple(message.choice.choices))


def constraint_to_pb(constraint: Constraint) -> common_pb2.StructuredOutput:
    if constraint.kind == "json_object":
        return common_pb2.StructuredOutput(json_object=True)
    if constraint.kind == "choice":
        return common_pb2.StructuredOutput(choice=common_pb2.Choices(choices=list(constraint.choices)))
    fields: dict[str, Any] = {constraint.kind: constraint.spec}  # regex or json_schema
    return common_pb2.StructuredOutput(**fields)


def sampling_to_pb(params: Sampling) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                     seed=params.seed, max_tokens=params.max_tokens, stop=list(params.stop),
                                     ignore_eos=params.ignore_eos, presence_penalty=params.presence_penalty,
                                     frequency_penalty=params.frequency_penalty,
                                     repetition_penalty=params.repetition_penalty, min_p=params.min_p,
                                     logit_bias=dict(params.logit_bias), min_tokens=params.min_tokens,
                                     stop_token_ids=list(params.stop_token_ids), logprobs=params.logprobs,
                                     prompt_logprobs=params.prompt_logprobs,
                                     structured_output=None if params.constraint is None
                                     else constraint_to_pb(params.constraint), n=params.n)
