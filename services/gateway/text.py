"""Tokenizer use at the gateway: prompt encoding, chat templates, and incremental detokenization
with stop strings."""

from __future__ import annotations

from pathlib import Path

from tokenizers.decoders import DecodeStream
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from services.common.errors import InvalidRequest

class PromptEncoder:
    def __init__(self, model_dir: Path) -> None:
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        self.max_model_len: int = config.max_position_embeddings
        eos = config.eos_token_id
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def encode_text(self, prompt: str) -> list[int]:
        if not prompt:
            raise InvalidRequest("prompt must not be empty")
        return list(self.tokenizer.encode(prompt, add_special_tokens=True))

    @property
    def supports_tools(self) -> bool:
        """Whether the chat template renders a `tools` list (tool calling is impossible without it)."""
        return "tools" in (self.tokenizer.chat_template or "")

    def check_ids(self, ids: tuple[int, ...]) -> list[int]:
        """A prompt given as token ids: non-empty, every id inside the vocabulary."""
        if not ids:
            raise InvalidRequest("prompt_tokens must not be empty")
        vocab = len(self.tokenizer)
        bad = next((i for i, token in enumerate(ids) if not 0 <= token < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"prompt_tokens[{bad}]={ids[bad]} is outside the model's vocabulary of {vocab}")
        return list(ids)

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        if not messages:
            raise InvalidRequest("chat.messages must not be empty")
        for index, (role, _) in enumerate(messages):
            if role not in ("system", "user", "assistant"):
                raise InvalidRequest(f"chat.messages[{index}].role must be system, user or assistant, got {role!r}")
        if self.tokenizer.chat_template is None:
            raise InvalidRequest("this model has no chat template; send a prompt instead")
        conversation = [{"role": role, "content": content} for role, content in messages]
        encoded = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
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
