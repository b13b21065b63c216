"""Nothing a client asks for is silently ignored.

The request models accept fields they do not declare (OpenAI's SDKs and tools such as LangChain
send many), and this module decides what each such field may be: harmless metadata is accepted
and ignored; a sampling or output control that this server does not implement is accepted only
at its neutral value (the one that asks for nothing, such as `presence_penalty: 0`, which SDKs
send by default) and refused with 400 naming it otherwise; any other field is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

# Fields that change nothing about the output: accepted with any value and ignored.
IGNORED_METADATA = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


def _empty(value: Any) -> bool:
    return value in (None, [], {}, "")


def _equals(neutral: float) -> Callable[[Any], bool]:
    return lambda value: value is None or (type(value) in (int, float) and value == neutral)


# Controls this server does not implement yet, with the values that ask for nothing.
_NEUTRAL: Mapping[str, Callable[[Any], bool]] = {
    "top_logprobs": _equals(0),
    "suffix": _empty,
    "tools": _empty,
    "functions": _empty,
    "tool_choice": lambda value: value in (None, "none"),
    "function_call": lambda value: value in (None, "none"),
    "guided_grammar": _empty,
    "use_beam_search": lambda value: value in (None, False),
    "length_penalty": _equals(1),
    "prompt_logprobs": lambda value: value is None,
}


def unsupported_field(extra: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """The first field of `extra` (a request's undeclared fields) that asks for something this
    server does not do, with the message to refuse it; None when every field may be ignored."""
    for name, value in (extra or {}).items():
        if name in IGNORED_METADATA:
            continue
        check = _NEUTRAL.get(name)
        if check is None:
            return name, f"{name} is not a field this server knows; remove it"
        if not check(value):
            return name, f"{name}={value!r} is not supported by this server (only its neutral value is)"
    return None
