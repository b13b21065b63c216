"""How the OpenAI API's endpoints shape their responses: whole objects, stream chunks and usage."""

from __future__ import annotations

import time
from typing import Any

from services.gateway.core import GenerateOutput, Usage


def _usage(output: GenerateOutput) -> dict[str, int]:
    usage = output.usage or Usage(0, 0)
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


class ResponseFormat:
    """How one endpoint shapes its objects."""

    endpoint = ""

    def __init__(self, request_id: str, model: str) -> None:
        self._base = {"id": request_id, "created": int(time.time()), "model": model}

    def first(self) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, output: GenerateOutput) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, output: GenerateOutput) -> dict[str, Any]:
        return {**self._base, "object": self.chunk_object, "choices": [], "usage": _usage(output)}

    def whole(self, outputs: list[GenerateOutput]) -> dict[str, Any]:
        raise NotImplementedError

    chunk_object = ""


class CompletionFormat(ResponseFormat):
    chunk_object = "text_completion"
    endpoint = "completions"

    def first(self) -> dict[str, Any]:
        return self._chunk("", None)

    def delta(self, output: GenerateOutput) -> dict[str, Any]:
        return self._chunk(output.text, output.finish_reason)

    def _chunk(self, text: str, finish: str | None) -> dict[str, Any]:
        return {**self._base, "object": "text_completion",
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    def whole(self, outputs: list[GenerateOutput]) -> dict[str, Any]:
        body = self._chunk("".join(o.text for o in outputs), outputs[-1].finish_reason)
        return {**body, "usage": _usage(outputs[-1])}


class ChatFormat(ResponseFormat):
    chunk_object = "chat.completion.chunk"
    endpoint = "chat_completions"

    def first(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def delta(self, output: GenerateOutput) -> dict[str, Any]:
        return self._chunk({"content": output.text} if output.text else {}, output.finish_reason)

    def _chunk(self, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
        return {**self._base, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    def whole(self, outputs: list[GenerateOutput]) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(o.text for o in outputs)}
        return {**self._base, "object": "chat.completion", "usage": _usage(outputs[-1]),
                "choices": [{"index": 0, "message": message, "finish_reason": outputs[-1].finish_reason,
                             "logprobs": None}]}

