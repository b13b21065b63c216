"""Tool calling (OpenAI's `tools` and `tool_choice`), the way vLLM serves it.

The tools are rendered into the prompt by the model's chat template (one that renders `tools` and
writes calls in the Hermes format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as
Qwen 2.5, Hermes and others do; any other template gets 400). Then, by `tool_choice`:

  none       the tools are not offered; plain text
  auto       free text; every `<tool_call>` block in it becomes a tool call, the rest is content
             (text that only looks like a call, unparseable or naming no offered tool, stays content)
  required   the output is constrained (a grammar, services.common.grammar) to a JSON list of one or
             more calls of the offered tools, each validating against its function's parameters
  {"type": "function", "function": {"name": N}}   constrained to N's arguments

A choice whose output holds calls ends with finish reason `tool_calls` (a named choice: `stop`, as
OpenAI's API does; a choice cut short by max_tokens keeps `length`). While streaming, content goes
out as it comes; from the moment a call may be starting, text is held back and the calls go out,
whole, when the choice ends.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidRequest
from services.common.grammar import Constraint

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
# A block is closed by its tag, or by the end of the output (a model that stops right after the JSON,
# or a stop string on the closing tag).
_BLOCK = re.compile(re.escape(_OPEN) + r"(.*?)(?:" + re.escape(_CLOSE) + r"|\Z)", re.DOTALL)
_JSON_ERRORS = (ValueError, RecursionError)  # malformed, or nested past what the parser recurses into
FORMAT_MARKER = _OPEN  # a chat template that writes calls this way


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text

    @staticmethod
    def new(name: str, arguments: Any) -> ToolCall:
        """A call with a fresh id; `arguments` is the parsed JSON value (always written back as JSON)."""
        return ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, json.dumps(arguments, ensure_ascii=False))


@dataclass(frozen=True, slots=True)
class Tools:
    """The functions a request offers and how it wants them used (validated when made)."""

    functions: tuple[dict[str, Any], ...]  # {"name", "description"?, "parameters"?}
    choice: str = "auto"  # "none", "auto", "required", or the name of the function to call
    parallel: bool = True  # OpenAI's parallel_tool_calls: false allows one call at most

    def __post_init__(self) -> None:
        if len(self.functions) > MAX_TOOLS:
            raise InvalidRequest(f"tools: at most {MAX_TOOLS} tools, got {len(self.functions)}")
        names = [function.get("name") for function in self.functions]
        for index, function in enumerate(self.functions):
            name = names[index]
            if not isinstance(name, str) or not _NAME.match(name):
                raise InvalidRequest(f"tools[{index}].function.name must be 1-64 letters, digits, '_' or '-'")
            if not isinstance(function.get("parameters", {}), dict):
                raise InvalidRequest(f"tools[{index}].function.parameters must be a JSON Schema object")
        if len(set(names)) != len(names):
            raise InvalidRequest("tools: function names must be unique")
        if self.choice in ("auto", "required") and not self.functions:
            raise InvalidRequest(f"tool_choice: {self.choice!r} needs at least one tool")
        if self.choice not in ("none", "auto", "required") and self.choice not in names:
            raise InvalidRequest(f"tool_choice names function {self.choice!r}, which is not in tools")

    def finish_reason(self, reason: str, calls: tuple[ToolCall, ...]) -> str:
        """A choice's finish reason once its calls are known."""
        if calls and reason == "stop" and self.choice in ("auto", "required"):
            return "tool_calls"
        return reason

    @property
    def offered(self) -> list[dict[str, Any]] | None:
        """What the chat template renders (OpenAI's tool objects), or None when none are offered."""
        if self.choice == "none" or not self.functions:
            return None
        return [{"type": "function", "function": function} for function in self.functions]

    def constraint(self) -> Constraint | None:
        """The grammar a required or named choice puts on the output."""
        if self.choice in ("none", "auto"):
            return None
        if self.choice != "required":
            return Constraint("json_schema", json.dumps(self._parameters(self.choice)))
        definitions: dict[str, Any] = {}
        calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                   "arguments": _hoisted(self._parameters(f["name"]), index,
                                                                         definitions)},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for index, f in enumerate(self.functions)]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        if definitions:
            schema["$defs"] = definitions
        return Constraint("json_schema", json.dumps(schema))

    def _parameters(self, name: str) -> dict[str, Any]:
        function = next(f for f in self.functions if f["name"] == name)
        return function.get("parameters") or {"type": "object"}

    def calls(self, text: str) -> tuple[ToolCall, ...]:
        """The calls in a whole output (ValueError, KeyError or TypeError: a constrained output that
        is not whole, for example cut short by max_tokens)."""
        if self.offered is None:
            return ()
        try:
            if self.choice == "required":
                return tuple(ToolCall.new(call["name"], call["arguments"]) for call in json.loads(text))
            if self.choice != "auto":
                return (ToolCall.new(self.choice, json.loads(text)),)
        except RecursionError:
            raise ValueError("the output nests deeper than can be parsed") from None
        calls = self._hermes_calls(text)
        return calls if self.parallel else calls[:1]

    def _hermes_calls(self, text: str) -> tuple[ToolCall, ...]:
        """Every `<tool_call>` block, or none if any block is not a call of an offered tool."""
        names = {function["name"] for function in self.functions}
        calls = []
        for block in _BLOCK.findall(text):
            try:
                call = json.loads(block)
            except _JSON_ERRORS:
                return ()
            if not isinstance(call, dict) or call.get("name") not in names or not isinstance(
                    call.get("arguments", {}), dict):
                return ()
            calls.append(ToolCall.new(call["name"], call.get("arguments", {})))
        return tuple(calls)


@dataclass(slots=True)
class ToolCallStream:
    """One choice's text on its way out: content deltas now, its calls when it ends."""

    tools: Tools
    _text: str = ""
    _sent: int = 0  # characters of _text already out as content
    _held: bool = False  # a call has started: nothing more goes out as content until the end

    def add(self, delta: str) -> str:
        """The content to send now for a text delta."""
        self._text += delta
        if self.tools.offered is None:
            return self._release(len(self._text))
        if self.tools.choice != "auto" or self._held:  # a constrained output is all calls
            return ""
        start = self._text.find(_OPEN, self._sent)
        if start >= 0:
            self._held = True
            return self._release(start)
        return self._release(len(self._text) - _partial_marker(self._text))

    def finish(self) -> tuple[str, tuple[ToolCall, ...]]:
        """The content still to send and the choice's calls, once it has ended."""
        try:
            calls = self.tools.calls(self._text)
        except (ValueError, KeyError, TypeError):
            calls = ()  # a constrained output cut short (max_tokens): it stays text
        rest = self._text[self._sent :]
        if not calls:
            return rest, ()
        return (_BLOCK.sub("", rest).strip() if self.tools.choice == "auto" else ""), calls

    def _release(self, end: int) -> str:
        out, self._sent = self._text[self._sent : end], max(self._sent, end)
        return out


def _hoisted(schema: dict[str, Any], index: int, definitions: dict[str, Any]) -> dict[str, Any]:
    """Function `index`'s parameters, nested in the required choice's schema: its own `$defs` (or
    `definitions`) move to the root under prefixed names, and its references follow them."""
    local = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    if not local:
        return schema
    prefix = f"f{index}_"
    for name, definition in local.items():
        definitions[prefix + name] = _rewrite_refs(definition, prefix)
    body = {key: value for key, value in schema.items() if key not in ("$defs", "definitions")}
    return _rewrite_refs(body, prefix)  # type: ignore[no-any-return]


def _rewrite_refs(node: Any, prefix: str) -> Any:
    if isinstance(node, dict):
        return {key: (re.sub(r"^#/(?:\$defs|definitions)/", f"#/$defs/{prefix}", value)
                      if key == "$ref" and isinstance(value, str) else _rewrite_refs(value, prefix))
                for key, value in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(item, prefix) for item in node]
    return node


def _partial_marker(text: str) -> int:
    """How many trailing characters of `text` could begin the call marker."""
    for length in range(min(len(_OPEN) - 1, len(text)), 0, -1):
        if _OPEN.startswith(text[-length:]):
            return length
    return 0


def with_tools(constraint: Constraint | None, tools: Tools | None) -> Constraint | None:
    """The one grammar on a request's output: its structured-output constraint's, or a required or
    named tool choice's (InvalidRequest for both)."""
    forced = None if tools is None else tools.constraint()
    if forced is not None and constraint is not None:
        raise InvalidRequest("tool_choice: a required or named tool choice constrains the output already; drop the "
                             "structured-output constraint (response_format, guided_*)")
    return constraint or forced


def tools_from_pb(functions: list[tuple[str, str, str]], choice: str, parallel: bool = True) -> Tools | None:
    """The gRPC API's tools: (name, description, parameters as JSON text) each, and the choice."""
    if not functions:
        return tools_from_openai(None, choice or None)
    specs = []
    for index, (name, description, parameters) in enumerate(functions):
        spec: dict[str, Any] = {"name": name}
        if description:
            spec["description"] = description
        if parameters:
            try:
                spec["parameters"] = json.loads(parameters)
            except _JSON_ERRORS as error:
                raise InvalidRequest(f"tools.functions[{index}].parameters_json is not JSON: {error}") from None
        specs.append(spec)
    return Tools(tuple(specs), choice or "auto", parallel)


def tools_from_openai(tools: list[Any] | None, tool_choice: Any, parallel: bool | None = None) -> Tools | None:
    """A chat request's `tools` and `tool_choice` (None: no tools); 400 naming the field if malformed."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice needs tools")
        return None
    functions = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise InvalidRequest(f"tools[{index}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        functions.append(tool["function"])
    return Tools(tuple(functions), _choice_name(tool_choice), parallel is not False)


def _choice_name(tool_choice: Any) -> str:
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, str) and tool_choice in ("none", "auto", "required"):
        return tool_choice
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if isinstance(name, str):
            return name
    raise InvalidRequest("tool_choice must be none, auto, required or {\"type\": \"function\", "
                         "\"function\": {\"name\": ...}}")
