"""How the OpenAI API's endpoints shape their responses: whole objects, stream chunks and usage.
Outputs come tagged with their choice's index (a completion request may carry several prompts:
choice i answers prompt i); usage sums every choice."""

from __future__ import annotations

import time
from typing import Any

from services.gateway.core import GenerateOutput, Usage

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

    def first(self) -> dict[str, Any]:
        return self._chunk([self._choice(0, "", None)])

    def delta(self, output: GenerateOutput, index: int) -> dict[str, Any]:
        return self._chunk([self._choice(index, output.text, output.finish_reason)])

    @staticmethod
    def _choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self._base, "object": "text_completion", "choices": choices}

    def whole(self, outputs: list[Indexed], choices: int) -> dict[str, Any]:
        grouped = _by_choice(outputs, choices)
        body = self._chunk([self._choice(i, "".join(o.text for o in group), group[-1].finish_reason)
                            for i, group in enumerate(grouped)])
        return {**body, "usage": _usage(_finished_usages(grouped))}


class ChatFormat(ResponseFormat):
    chunk_object = "chat.completion.chunk"
    endpoint = "chat_completions"

    def first(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, None, 0)

    def delta(self, output: GenerateOutput, index: int) -> dict[str, Any]:
        return self._chunk({"content": output.text} if output.text else {}, output.finish_reason, index)

    def _chunk(self, delta: dict[str, str], finish: str | None, index: int) -> dict[str, Any]:
        return {**self._base, "object": "chat.completion.chunk",
                "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    def whole(self, outputs: list[Indexed], choices: int) -> dict[str, Any]:
        grouped = _by_choice(outputs, choices)
        return {**self._base, "object": "chat.completion", "usage": _usage(_finished_usages(grouped)),
                "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(o.text for o in group)},
                             "finish_reason": group[-1].finish_reason, "logprobs": None}
                            for i, group in enumerate(grouped)]}
