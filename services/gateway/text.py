"""Tokenizer use at the gateway: prompt encoding, chat templates, and incremental detokenization
with stop strings."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers.decoders import DecodeStream
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from services.common.context_length import served_length
from services.common.errors import InvalidRequest
from services.gateway.tools import FORMAT_MARKER, ToolCall

_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """One message of a conversation."""

    role: str  # system, user, assistant or tool
    content: str
    tool_call_id: str = ""  # a tool message: the call it answers
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant message: the calls it made

    def rendered(self) -> dict[str, Any]:
        """The message as chat templates take it."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id, "type": "function",
                                      "function": {"name": call.name, "arguments": _arguments(call.arguments)}}
                                     for call in self.tool_calls]
        return message


def _arguments(text: str) -> Any:
    """A call's arguments as a template renders them (an object; text that is not JSON as it is)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


class PromptEncoder:
    def __init__(self, model_dir: Path, chat_template: str | None = None) -> None:
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_dir)
        if chat_template is not None:  # an operator's template replaces the model's own
            self.tokenizer.chat_template = chat_template
        config = AutoConfig.from_pretrained(model_dir)
        self.max_model_len: int = served_length(config)  # what the workers serve (context_length.py)
        eos = config.eos_token_id
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def encode_text(self, prompt: str) -> list[int]:
        if not prompt:
            raise InvalidRequest("prompt must not be empty")
        return list(self.tokenizer.encode(prompt, add_special_tokens=True))

    @property
    def supports_tools(self) -> bool:
        """Whether the chat template renders a `tools` list and has the model write calls in the
        format services.gateway.tools parses (tool calling is impossible without both)."""
        template = self.tokenizer.chat_template or ""
        # a marker the tokenizer treats as special would be dropped from the decoded text
        special = FORMAT_MARKER in self.tokenizer.all_special_tokens
        return "tools" in template and FORMAT_MARKER in template and not special

    def check_ids(self, ids: tuple[int, ...]) -> list[int]:
        """A prompt given as token ids: non-empty, every id inside the vocabulary."""
        if not ids:
            raise InvalidRequest("prompt_tokens must not be empty")
        vocab = len(self.tokenizer)
        bad = next((i for i, token in enumerate(ids) if not 0 <= token < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"prompt_tokens[{bad}]={ids[bad]} is outside the model's vocabulary of {vocab}")
        return list(ids)

    def encode_chat(self, messages: Sequence[ChatTurn | tuple[str, str]],
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The conversation through the chat template, with the generation prompt (and the offered
        tools, which need a template that supports them)."""
        if not messages:
            raise InvalidRequest("chat.messages must not be empty")
        turns = [turn if isinstance(turn, ChatTurn) else ChatTurn(*turn) for turn in messages]
        for index, turn in enumerate(turns):
            if turn.role not in _ROLES:
                raise InvalidRequest(f"chat.messages[{index}].role must be one of {', '.join(_ROLES)}, got "
                                     f"{turn.role!r}")
            if (turn.role == "tool" or turn.tool_calls) and not self.supports_tools:
                raise InvalidRequest(f"chat.messages[{index}]: this model's chat template has no tool support")
            if turn.role == "tool" and not turn.tool_call_id:
                raise InvalidRequest(f"chat.messages[{index}].tool_call_id: a tool message names the call it answers")
        if self.tokenizer.chat_template is None:
            raise InvalidRequest("this model has no chat template; send a prompt instead")
        if tools and not self.supports_tools:
            raise InvalidRequest("tools: this model's chat template has no tool support, so it cannot call tools")
        conversation = [turn.rendered() for turn in turns]
        # a list of ids, or a BatchEncoding holding them; the ignore: list is invariant, dict[str, Any] is a dict
        encoded: Any = self.tokenizer.apply_chat_template(conversation, tools=tools,  # type: ignore[arg-type]
                                                          add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)


class TextStream:
    """Turns tokens into text deltas, incrementally (each token is decoded once, by the tokenizer's
    own streaming decoder, which holds back incomplete characters). Holds back text that may still
    become a stop string, and cuts the text before the first stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._text = ""
        self._emitted = 0

    def add(self, token_id: int) -> tuple[str, bool]:
        """Text delta after `token_id`, and whether a stop string ended the text."""
        self._text += self._decoder.step(self._backend, token_id) or ""
        cut = self._first_stop()
        if cut is not None:
            return self._take(cut), True
        return self._take(len(self._text) - self._hold), False

    def flush(self) -> str:
        """The rest of the text once generation ended."""
        return self._take(len(self._text))

    def _first_stop(self) -> int | None:
        start = max(0, self._emitted - self._hold)
        hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _take(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta, self._emitted = self._text[self._emitted : end], end
        return delta
