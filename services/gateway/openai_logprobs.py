"""Log-probabilities in the OpenAI API's two shapes.

Completions (`logprobs: n`, with `echo` the prompt's tokens first, the very first one unscored):
  {"tokens": [str], "token_logprobs": [float | null], "top_logprobs": [{str: float} | null],
   "text_offset": [int]}   each top_logprobs dict holds the n most likely tokens and the chosen one.
Chat (`logprobs: true`, `top_logprobs: n`):
  {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
A token's string is its id decoded alone (a piece of a multi-byte character decodes to U+FFFD, as in
vLLM); two ids that decode alike share one key of a completions top_logprobs dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from transformers import PreTrainedTokenizerBase

from services.common.logprobs import TokenLogprob


class TokenNames:
    """Token id -> its text alone, decoded once per id (at most the vocabulary's size)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._names: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        name = self._names.get(token_id)
        if name is None:
            name = self._names[token_id] = cast(str, self._tokenizer.decode([token_id]))  # one sequence: one string
        return name


def completion_logprobs(names: TokenNames, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None],
                        text_offset: int) -> dict[str, list[Any]]:
    """The completions shape for these tokens (None: the unscored first prompt token), their text
    offsets counted from `text_offset`."""
    tokens = [names(token_id) for token_id in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [None if e is None else _top_dict(names, e) for e in entries], "text_offset": offsets}


def _top_dict(names: TokenNames, entry: TokenLogprob) -> dict[str, float]:
    top = {names(token_id): value for token_id, value in entry.top}
    top.setdefault(names(entry.token_id), entry.logprob)
    return top


def chat_logprobs(names: TokenNames, entries: Sequence[TokenLogprob]) -> dict[str, list[dict[str, Any]]]:
    return {"content": [{**_chat_token(names(e.token_id), e.logprob),
                         "top_logprobs": [_chat_token(names(token_id), value) for token_id, value in e.top]}
                        for e in entries]}


def _chat_token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def joined(parts: Sequence[dict[str, list[Any]] | None]) -> dict[str, list[Any]] | None:
    """The streamed pieces of one choice's logprobs as one (the whole response's)."""
    present = [part for part in parts if part is not None]
    if not present:
        return None
    return {key: [value for part in present for value in part[key]] for key in present[0]}
