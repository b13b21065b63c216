"""Request bodies of the OpenAI-compatible HTTP API (the subset this server implements), and the
error shape `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

import grpc

from services.common.errors import InvalidRequest
from services.gateway.text import ChatTurn
from services.gateway.tools import ToolCall

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable_error",
              504: "timeout_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": param,
                      "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(BaseModel):
    # Clients send many fields this model does not declare; openai_fields judges each (ignored
    # metadata, a neutral value of an unimplemented control, or 400).
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's, but vLLM's clients send it
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False
    # logit controls (services.common.logit_controls checks their ranges)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM's
    min_p: float | None = None  # vLLM's
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias
    min_tokens: int = Field(default=0, ge=0)  # vLLM's
    stop_token_ids: list[int] | None = None  # vLLM's
    # structured output (openai_structured turns these into one constraint)
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's
    guided_regex: str | None = None  # vLLM's
    guided_choice: list[str] | None = None  # vLLM's
    cache_salt: Any = None  # vLLM's: added to the prefix-cache salt (a string of at most 256 bytes)

    def structured_fields(self) -> dict[str, Any]:
        return {"response_format": self.response_format, "guided_json": self.guided_json,
                "guided_regex": self.guided_regex, "guided_choice": self.guided_choice}

    def logit_bias_items(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias), ids ascending; a key that is not a token id raises ValueError."""
        items = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            items.append((int(key), bias))
        return tuple(sorted(items))

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


MAX_PROMPTS = 64  # prompts in one completion request (each is its own generation)


class CompletionRequest(_Common):
    # Text, a list of texts, token ids, or a list of token-id lists, as vLLM accepts them.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | tuple[int, ...]]:
        """One entry per generation: text, or token ids taken as they are. Raises InvalidRequest."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise InvalidRequest("prompt must not be an empty list")
        if len(self.prompt) > MAX_PROMPTS:
            raise InvalidRequest(f"prompt holds {len(self.prompt)} prompts; at most {MAX_PROMPTS} per request")
        if isinstance(self.prompt[0], int):
            return [tuple(self.prompt)]  # type: ignore[arg-type]
        return [p if isinstance(p, str) else tuple(p) for p in self.prompt]  # type: ignore[misc]


class ChatContentPart(_Strict):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ChatToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: str
    content: str | list[ChatContentPart] | None = ""
    tool_calls: list[ChatToolCall] | None = None  # an assistant message's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def turn(self) -> ChatTurn:
        calls = tuple(ToolCall(call.id, call.function.name, call.function.arguments) for call in self.tool_calls or ())
        return ChatTurn(self.role, self.text(), self.tool_call_id or "", calls)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    tools: list[Any] | None = None  # [{"type": "function", "function": {...}}] (services.gateway.tools)
    tool_choice: Any = None  # "none", "auto", "required" or {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool | None = None  # false: one call at most
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None  # alternatives per token (0-20), with logprobs: true
