"""How the OpenAI API's endpoints shape their responses: whole objects, stream chunks and usage.
Outputs come tagged with their choice's index (a completion request may carry several prompts:
choice i answers prompt i); usage sums every choice. Log-probabilities: openai_logprobs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from services.common.logprobs import TokenLogprob
from services.gateway.core import GenerateOutput, Usage
from services.gateway.openai_logprobs import TokenNames, chat_logprobs, completion_logprobs, joined
from services.gateway.tools import ToolCall

Indexed = tuple[int, GenerateOutput]


def _usage(usages: list[Usage]) -> dict[str, int]:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _by_choice(outputs: list[Indexed], choices: int) -> list[list[GenerateOutput]]:
    grouped: list[list[GenerateOutput]] = [[] for _ in range(choices)]
    for index, output in outputs:
        grouped[index].append(output)
    return grouped


def _finished_usages(grouped: list[list[GenerateOutput]]) -> list[Usage]:
    return [outputs[-1].usage or Usage(0, 0) for outputs in grouped]


class ResponseFormat:
    """How one endpoint shapes its objects."""

    endpoint = ""
    chunk_object = ""

    def __init__(self, request_id: str, model: str) -> None:
        self._base = {"id": request_id, "created": int(time.time()), "model": model}

    def first(self) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, output: GenerateOutput, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, usages: list[Usage]) -> dict[str, Any]:
        return {**self._base, "object": self.chunk_object, "choices": [], "usage": _usage(usages)}

    def whole(self, outputs: list[Indexed], choices: int) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    chunk_object = "text_completion"
    endpoint = "completions"

    def __init__(self, request_id: str, model: str, names: TokenNames | None = None,
                 echo: Sequence[str] | None = None) -> None:
        super().__init__(request_id, model)
        self._names = names  # set when the request asks for logprobs
        self._echo = echo  # each choice's prompt text, when the request asks for echo
        self._offsets: dict[int, int] = {}  # choice -> text offset of its next token

    def first(self) -> dict[str, Any]:
        return self._chunk([{"index": 0, "text": "", "finish_reason": None, "logprobs": None}])

    def delta(self, output: GenerateOutput, index: int) -> dict[str, Any]:
        return self._chunk([self._choice(index, output)])

    def _choice(self, index: int, output: GenerateOutput) -> dict[str, Any]:
        """One output of choice `index`; its first output echoes the prompt (and its scores) when asked."""
        text, token_ids = output.text, list(output.token_ids)
        entries: list[TokenLogprob | None] = list(output.logprobs)
        if index not in self._offsets:
            self._offsets[index] = 0
            if self._echo is not None:
                text = self._echo[index] + text
                if output.prompt_token_ids:
                    token_ids = [*output.prompt_token_ids, *token_ids]
                    entries = [None, *(output.prompt_logprobs or ()), *entries]
        logprobs = None
        if self._names is not None:
            logprobs = completion_logprobs(self._names, token_ids, entries, self._offsets[index])
            self._offsets[index] += sum(len(token) for token in logprobs["tokens"])
        return {"index": index, "text": text, "finish_reason": output.finish_reason, "logprobs": logprobs}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self._base, "object": "text_completion", "choices": choices}

    def whole(self, outputs: list[Indexed], choices: int) -> dict[str, Any]:
        grouped = _by_choice(outputs, choices)
        parts = [[self._choice(i, output) for output in group] for i, group in enumerate(grouped)]
        body = self._chunk([{"index": i, "text": "".join(part["text"] for part in made),
                             "finish_reason": made[-1]["finish_reason"],
                             "logprobs": joined([part["logprobs"] for part in made])}
                            for i, made in enumerate(parts)])
        return {**body, "usage": _usage(_finished_usages(grouped))}


class ChatFormat(ResponseFormat):
    chunk_object = "chat.completion.chunk"
    endpoint = "chat_completions"

    def __init__(self, request_id: str, model: str, names: TokenNames | None = None) -> None:
        super().__init__(request_id, model)
        self._names = names  # set when the request asks for logprobs
        self._introduced = {0}  # choices whose role went out (choice 0's in the first chunk)

    def first(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, None, 0, None)

    def delta(self, output: GenerateOutput, index: int) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": output.text} if output.text else {}
        if index not in self._introduced:  # each choice's first delta says whose message it is
            self._introduced.add(index)
            delta = {"role": "assistant", **delta}
        if output.tool_calls:  # whole, with the choice's end
            delta["tool_calls"] = [{"index": i, **_tool_call(call)} for i, call in enumerate(output.tool_calls)]
        return self._chunk(delta, output.finish_reason, index, self._logprobs(output))

    def _logprobs(self, output: GenerateOutput) -> dict[str, Any] | None:
        return None if self._names is None else chat_logprobs(self._names, output.logprobs)

    def _chunk(self, delta: dict[str, Any], finish: str | None, index: int,
               logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return {**self._base, "object": "chat.completion.chunk",
                "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}

    def whole(self, outputs: list[Indexed], choices: int) -> dict[str, Any]:
        grouped = _by_choice(outputs, choices)
        return {**self._base, "object": "chat.completion", "usage": _usage(_finished_usages(grouped)),
                "choices": [{"index": i, "message": _message(group), "finish_reason": group[-1].finish_reason,
                             "logprobs": joined([self._logprobs(output) for output in group])}
                            for i, group in enumerate(grouped)]}


def _message(outputs: list[GenerateOutput]) -> dict[str, Any]:
    """A whole choice as an assistant message (its calls, when it made any: content null if empty)."""
    text, calls = "".join(output.text for output in outputs), outputs[-1].tool_calls
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": [_tool_call(call) for call in calls]}


def _tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
