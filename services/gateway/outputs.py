"""What the client gets of a request: its outputs (each a choice's new tokens, text and scores, or
its end with usage), and the rules for building them from what the workers delivered."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import BackendUnavailable
from services.common.logprobs import TokenLogprob
from services.common.sampling import Sampling
from services.gateway.attempt import Delivery
from services.gateway.tools import ToolCall


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class GenerateOutput:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when the request asks for logprobs
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # on the first output, when asked
    prompt_token_ids: tuple[int, ...] = ()  # with prompt_logprobs: the prompt (after any chat template)
    choice: int = 0  # which of the request's choices (sampling.n) it belongs to
    tool_calls: tuple[ToolCall, ...] = ()  # on a choice's last output, when its text held calls


def token_output(sampling: Sampling, prompt_ids: list[int], delivery: Delivery, first: bool) -> GenerateOutput:
    """The output of one new token (its text is added by the caller), with the log-probabilities the
    request asks for. A worker that did not send them (a first token re-sent by the decode after the
    prefill that sampled it died) fails the request rather than leave a gap."""
    if sampling.logprobs is not None and delivery.logprob is None:
        raise BackendUnavailable("a token's log-probability was lost with the worker that sampled it; retry")
    scored = () if delivery.logprob is None else (delivery.logprob,)
    if not first or sampling.prompt_logprobs is None:
        return GenerateOutput([delivery.token_id], "", logprobs=scored)
    if [entry.token_id for entry in delivery.prompt_logprobs] != prompt_ids[1:]:
        raise BackendUnavailable("the prompt's log-probabilities were lost with the prefill worker; retry")
    return GenerateOutput([delivery.token_id], "", logprobs=scored, prompt_logprobs=delivery.prompt_logprobs,
                          prompt_token_ids=tuple(prompt_ids))


def finished_already(sampling: Sampling, generated: list[int], ended: bool,
                     eos_token_ids: frozenset[int]) -> str | None:
    """The finish reason of a completion that has all its tokens already, else None (`ended`: its
    last token completed its grammar, so a failover must not sample one more)."""
    if ended:
        return "stop"
    if len(generated) >= sampling.max_tokens:
        return "length"
    if generated and (generated[-1] in sampling.stop_token_ids
                      or not sampling.ignore_eos and generated[-1] in eos_token_ids):
        return "stop"
    return None
