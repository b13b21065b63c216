"""Typed results and errors of the gateway SDK, and the request building both clients share."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from services.common.logprobs import TokenLogprob, from_pb
from services.common.pb import common_pb2, gateway_pb2

_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
           common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls"}
# A chat message: (role, content), or a mapping with role, content and, for tool calling,
# tool_call_id (a tool's result) or tool_calls (an assistant's calls: id, name, arguments).
Message = tuple[str, str] | Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class GenerateChunk:
    """One streamed step: new token ids and text; the last chunk has finish_reason and usage."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    usage: Usage | None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, when asked (logprobs=)
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first chunk, when asked (prompt_logprobs=)
    choice: int = 0  # which of the request's choices (n=) it belongs to
    tool_calls: list[ToolCall] = field(default_factory=list)  # on the last chunk, when the model called tools


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole generation."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    usage: Usage | None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, when asked (logprobs=)
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first chunk, when asked (prompt_logprobs=)
    tool_calls: list[ToolCall] = field(default_factory=list)  # when the model called tools (finish "tool_calls")


class GatewayError(Exception):
    """A call failed; `code()` is the gRPC status (INVALID_ARGUMENT, DEADLINE_EXCEEDED, ...)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of calls that failed with UNAVAILABLE before any token arrived (safe to repeat)."""

    max_retries: int = 3
    initial_backoff_seconds: float = 0.1
    max_backoff_seconds: float = 2.0
    retry_codes: frozenset[grpc.StatusCode] = field(default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE}))

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff before retry number `attempt` (from 0)."""
        ceiling = min(self.max_backoff_seconds, self.initial_backoff_seconds * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True, slots=True)
class LogitControls:
    """Penalties, logit bias, min-p, min_tokens and stop token ids of a request (SamplingParams in
    common.proto documents each); the defaults ask for nothing."""

    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    stop_token_ids: Sequence[int] = ()

    def to_pb(self, sampling: common_pb2.SamplingParams) -> None:
        """Set these controls on `sampling`."""
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
            if (value := getattr(self, name)) is not None:
                setattr(sampling, name, value)
        sampling.logit_bias.update(self.logit_bias)
        sampling.min_tokens = self.min_tokens
        sampling.stop_token_ids.extend(self.stop_token_ids)


@dataclass(frozen=True, slots=True)
class Guided:
    """Structured output, one of: any JSON object, a JSON schema (a dict or JSON text), a regular
    expression the whole output matches, or a choice of strings the output is exactly one of."""

    json_object: bool = False
    json_schema: Mapping[str, object] | str | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None

    def to_pb(self) -> common_pb2.StructuredOutput:
        if self.json_schema is not None:
            schema = self.json_schema if isinstance(self.json_schema, str) else json.dumps(self.json_schema)
            return common_pb2.StructuredOutput(json_schema=schema)
        if self.regex is not None:
            return common_pb2.StructuredOutput(regex=self.regex)
        if self.choice is not None:
            return common_pb2.StructuredOutput(choice=common_pb2.Choices(choices=list(self.choice)))
        return common_pb2.StructuredOutput(json_object=self.json_object)


def build_request(prompt: str | Sequence[int] | None, messages: Sequence[Message] | None,
                  max_tokens: int | None,
                  temperature: float | None, top_p: float | None, top_k: int, seed: int | None,
                  stop: Sequence[str], ignore_eos: bool, request_id: str,
                  max_cache_budget_mb: float = 0.0,
                  controls: LogitControls | None = None, *, logprobs: int | None = None,
                  prompt_logprobs: int | None = None, guided: Guided | None = None, n: int | None = None,
                  best_of: int = 0, tools: Sequence[Mapping[str, Any]] = (),
                  tool_choice: str = "", cache_salt: str = "") -> gateway_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                         max_tokens=max_tokens, stop=list(stop), ignore_eos=ignore_eos,
                                         logprobs=logprobs, prompt_logprobs=prompt_logprobs, n=n)
    if controls is not None:
        controls.to_pb(sampling)
    if guided is not None:
        sampling.structured_output.CopyFrom(guided.to_pb())
    request = gateway_pb2.GenerateRequest(sampling=sampling, request_id=request_id,
                                          max_cache_budget_mb=max_cache_budget_mb, best_of=best_of,
                                          cache_salt=cache_salt)
    for tool in tools:  # OpenAI function objects: name, description, parameters
        request.tools.functions.append(gateway_pb2.FunctionTool(
            name=tool["name"], description=tool.get("description", ""),
            parameters_json=json.dumps(tool["parameters"]) if "parameters" in tool else ""))
    request.tools.choice = tool_choice
    if messages is not None:
        request.chat.CopyFrom(gateway_pb2.ChatMessages(messages=[_message_pb(message) for message in messages]))
    elif prompt is not None and not isinstance(prompt, str):
        request.prompt_tokens.token_ids.extend(prompt)
    else:
        request.prompt = prompt or ""
    return request


def _message_pb(message: Message) -> gateway_pb2.ChatMessage:
    if isinstance(message, tuple):
        return gateway_pb2.ChatMessage(role=message[0], content=message[1])
    calls = [gateway_pb2.ToolCall(id=call["id"], name=call["name"], arguments=call["arguments"])
             for call in message.get("tool_calls", ())]
    return gateway_pb2.ChatMessage(role=message["role"], content=message.get("content") or "",
                                   tool_call_id=message.get("tool_call_id", ""), tool_calls=calls)


def to_chunk(response: gateway_pb2.GenerateResponse) -> GenerateChunk:
    usage = response.usage if response.HasField("usage") else None
    prompt = [from_pb(entry) for entry in response.prompt_logprobs]
    return GenerateChunk(response.request_id, list(response.token_ids), response.text,
                         _FINISH.get(response.finish_reason),
                         Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) if usage else None,
                         [from_pb(entry) for entry in response.logprobs], prompt or None, response.choice,
                         [ToolCall(call.id, call.name, call.arguments) for call in response.tool_calls])


def join(chunks: list[GenerateChunk]) -> Completion:
    if not chunks:
        raise GatewayError(grpc.StatusCode.INTERNAL, "the gateway closed the stream without a response")
    if any(chunk.choice for chunk in chunks):
        raise ValueError("the request has several choices (n > 1): use choices() to get each")
    last = chunks[-1]
    return Completion(last.request_id, [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks),
                      last.finish_reason, last.usage, [entry for c in chunks for entry in c.logprobs],
                      chunks[0].prompt_logprobs, last.tool_calls)


def join_choices(chunks: list[GenerateChunk]) -> list[Completion]:
    """One Completion per choice, in choice order."""
    by_choice: dict[int, list[GenerateChunk]] = {}
    for chunk in chunks:
        by_choice.setdefault(chunk.choice, []).append(chunk)
    return [join([replace(chunk, choice=0) for chunk in by_choice[choice]]) for choice in sorted(by_choice)]


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()
