"""Log-probabilities of chosen and prompt tokens, as vLLM and OpenAI return them.

A value is `log_softmax` of the model's float32 logits at that position, before any penalty, logit
bias, temperature or truncation (vLLM's default `raw_logprobs`): what Hugging Face computes from the
same logits. With each token come the `top_n` most likely tokens there (0-20) and the token's rank.

The decode computes them for the tokens it samples, the prefill for the first token and, when
asked, for every prompt token after the first (`prompt_logprobs`, OpenAI's `echo`); the arithmetic
is in services.common.scoring. This module holds no torch: the client SDK uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidRequest
from services.common.pb import common_pb2

MAX_TOP_LOGPROBS = 20  # OpenAI's and vLLM's limit on alternatives per position


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int  # 1 for the most likely token; ties share the better rank
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the top_n, most likely first


def check_top_n(field: str, value: int | None) -> None:
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"{field} must be in [0, {MAX_TOP_LOGPROBS}], got {value}")


def to_pb(entry: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(token_id=entry.token_id, logprob=entry.logprob, rank=entry.rank,
                                   top_token_ids=[token for token, _ in entry.top],
                                   top_logprobs=[value for _, value in entry.top])


def token_fields(logprob: TokenLogprob | None, prompt: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The log-probability fields of a FirstToken or DecodeToken message, as constructor arguments."""
    fields: dict[str, Any] = {"prompt_logprobs": [to_pb(entry) for entry in prompt]}
    if logprob is not None:
        fields["logprob"] = to_pb(logprob)
    return fields


def from_pb(entry: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(entry.token_id, entry.logprob, entry.rank,
                        tuple(zip(entry.top_token_ids, entry.top_logprobs)))
