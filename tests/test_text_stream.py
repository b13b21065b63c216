"""The gateway's detokenizer: text deltas equal the whole decode, stop strings cut the text, and
each token is decoded once (it used to decode the whole output again for every token: O(n^2) on
the gateway's event loop)."""

from __future__ import annotations

from typing import Any

import pytest

from services.gateway.text import TextStream

TEXTS = ["Hello, world! naïve café — 日本語のテキスト 🎉🎉 done.\n\n  spaces  here",
         "def f(x):\n    return x**2  # ok", "A" * 50 + " 🦀🦀🦀 " + "b" * 20]


class _NoWholeDecode:
    """The real tokenizer, except that decoding a whole list of ids is refused."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        if name in ("decode", "batch_decode", "convert_tokens_to_string"):
            raise AssertionError(f"TextStream called tokenizer.{name}: it must decode incrementally")
        return getattr(self._tokenizer, name)


def _stream(encoder, text: str, stop: tuple[str, ...] = ()) -> tuple[str, bool]:
    stream = TextStream(_NoWholeDecode(encoder.tokenizer), stop)
    out = []
    for token in encoder.encode_text(text) + [encoder.tokenizer.eos_token_id]:
        delta, stopped = stream.add(token)
        out.append(delta)
        if stopped:
            return "".join(out), True
    return "".join(out) + stream.flush(), False


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_whole_decode_without_redecoding(encoder, text: str) -> None:
    ids = encoder.encode_text(text) + [encoder.tokenizer.eos_token_id]
    assert _stream(encoder, text) == (encoder.tokenizer.decode(ids, skip_special_tokens=True), False)


def test_stop_string_cuts_the_text_even_across_tokens(encoder) -> None:
    assert _stream(encoder, "one two three four five", stop=("thr", "four")) == ("one two ", True)


def test_text_that_might_become_a_stop_string_is_held_back(encoder) -> None:
    stream = TextStream(encoder.tokenizer, ("STOP!",))
    deltas = [stream.add(token)[0] for token in encoder.encode_text("abc ST")]
    assert "".join(deltas) == "ab" and stream.flush() == "c ST"  # the last 4 characters wait
