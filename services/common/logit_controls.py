"""Request controls that reshape the logits before a token is chosen, as vLLM and OpenAI define them.

Applied in this order to a row's float32 logits (each only when the request asks for it):
repetition_penalty over every token of the prompt and completion so far (Hugging Face's
RepetitionPenaltyLogitsProcessor: a positive logit divided by it, a negative one multiplied),
frequency_penalty x count and presence_penalty over the completion's tokens (OpenAI's formula),
logit_bias added per token id, then, while the completion is shorter than min_tokens, the
end-of-sequence and stop_token_ids tokens masked out. min_p, a truncation of the distribution, is
applied by the sampler after temperature (services.common.sampling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from services.common.errors import InvalidRequest

MAX_PENALTY = 2.0  # OpenAI's range for presence and frequency penalties: [-2, 2]
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a bias: [-100, 100]
MAX_TOKEN_LIST = 1024  # entries in logit_bias, and stop_token_ids


@dataclass(frozen=True, slots=True)
class TokenContext:
    """What the history-dependent controls see for one row: the prompt and the completion so far
    (`completion_start` is where the completion begins in `tokens`; a failover moves earlier
    completion tokens into the prompt), and the model's end-of-sequence ids."""

    tokens: Sequence[int]
    completion_start: int
    eos_token_ids: frozenset[int]

    @property
    def completion(self) -> Sequence[int]:
        return self.tokens[self.completion_start :]


def check_controls(presence_penalty: float, frequency_penalty: float, repetition_penalty: float, min_p: float,
                   logit_bias: tuple[tuple[int, float], ...], stop_token_ids: tuple[int, ...]) -> None:
    """Raise InvalidRequest naming the first control out of its range (NaN is out of every range)."""
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not -MAX_PENALTY <= value <= MAX_PENALTY:
            raise InvalidRequest(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
    if not 0 < repetition_penalty <= MAX_REPETITION_PENALTY:
        raise InvalidRequest(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], got {repetition_penalty}")
    if not 0 <= min_p <= 1:
        raise InvalidRequest(f"min_p must be in [0, 1], got {min_p}")
    if len(logit_bias) > MAX_TOKEN_LIST or len(stop_token_ids) > MAX_TOKEN_LIST:
        raise InvalidRequest(f"logit_bias and stop_token_ids take at most {MAX_TOKEN_LIST} token ids each")
    ids = [token_id for token_id, _ in logit_bias]
    if len(set(ids)) != len(ids):  # "5" and " 5" are one token id: which bias would be meant?
        twice = next(token_id for token_id in ids if ids.count(token_id) > 1)
        raise InvalidRequest(f"logit_bias names token id {twice} twice")
    for token_id, bias in logit_bias:
        if token_id < 0 or not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
            raise InvalidRequest(f"logit_bias[{token_id}] must be a token id >= 0 with a bias in "
                                 f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias}")
    if any(token_id < 0 for token_id in stop_token_ids):
        raise InvalidRequest("stop_token_ids must be token ids >= 0")


def check_vocabulary(logit_bias: tuple[tuple[int, float], ...], stop_token_ids: tuple[int, ...],
                     vocab_size: int) -> None:
    """Raise InvalidRequest for a token id the model does not have."""
    for field, ids in (("logit_bias", [token_id for token_id, _ in logit_bias]), ("stop_token_ids", stop_token_ids)):
        outside = [token_id for token_id in ids if token_id >= vocab_size]
        if outside:
            raise InvalidRequest(f"{field} names token id {outside[0]}, outside the vocabulary of {vocab_size}")


def apply_controls(logits: torch.Tensor, controls: LogitControlsLike, position: int,
                   context: TokenContext) -> torch.Tensor:
    """The row's logits after the request's controls (a new tensor; `logits` is left as it is).
    Token ids were checked against the vocabulary when the request was admitted (check_vocabulary)."""
    scores = logits.float().clone()
    if controls.repetition_penalty != 1 and context.tokens:
        seen = torch.tensor(sorted(set(context.tokens)), dtype=torch.long)
        picked = scores[seen]
        penalty = controls.repetition_penalty
        scores[seen] = torch.where(picked < 0, picked * penalty, picked / penalty)
    completion = context.completion
    if (controls.presence_penalty or controls.frequency_penalty) and completion:
        ids, counts = torch.unique(torch.tensor(list(completion), dtype=torch.long), return_counts=True)
        scores[ids] -= controls.frequency_penalty * counts.float() + controls.presence_penalty
    if controls.logit_bias:
        ids = torch.tensor([token_id for token_id, _ in controls.logit_bias], dtype=torch.long)
        scores[ids] += torch.tensor([bias for _, bias in controls.logit_bias])
    if position < controls.min_tokens:
        banned = sorted(context.eos_token_ids | set(controls.stop_token_ids))
        if banned:
            scores[torch.tensor(banned, dtype=torch.long)] = float("-inf")
    return scores


class LogitControlsLike(Protocol):
    """The fields apply_controls reads (services.common.sampling.Sampling has them)."""

    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def repetition_penalty(self) -> float: ...
    @property
    def logit_bias(self) -> tuple[tuple[int, float], ...]: ...
    @property
    def min_tokens(self) -> int: ...
    @property
    def stop_token_ids(self) -> tuple[int, ...]: ...
