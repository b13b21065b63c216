"""Structured output as OpenAI and vLLM clients ask for it, as one grammar constraint
(services.common.grammar):

  response_format {"type": "json_object"}                       any JSON object
  response_format {"type": "json_schema", "json_schema": {"schema": {...}, "name", "strict"}}
  guided_json (a schema, as an object or JSON text), guided_regex, guided_choice   (vLLM's)

`response_format: {"type": "text"}`, and an empty value of any of these, ask for nothing. At most
one constraint per request; anything else (an unknown type, a schema that does not compile, vLLM's
guided_grammar) is 400 naming the field.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from services.common.errors import InvalidRequest
from services.common.grammar import Constraint


_ABSENT: tuple[Any, ...] = (None, "", [], {}, {"type": "text"})  # what SDKs send for "no constraint"


async def constraint_of(fields: dict[str, Any]) -> Constraint | None:
    """The constraint the request's structured-output fields ask for (None: free text), its grammar
    compiled once off the event loop (a big schema takes tens of ms)."""
    given = [(name, value) for name, value in fields.items() if value not in _ABSENT]
    if len(given) > 1:
        raise InvalidRequest(f"{given[1][0]}: give one structured-output constraint, not "
                             f"{' and '.join(name for name, _ in given)}")
    if not given:
        return None
    name, value = given[0]
    try:
        constraint = _constraint(name, value)
        await asyncio.to_thread(constraint.check)
    except InvalidRequest as error:
        raise InvalidRequest(f"{name}: {error}") from None
    return constraint


def _constraint(name: str, value: Any) -> Constraint:
    if name == "guided_regex":
        return Constraint("regex", value)
    if name == "guided_choice":
        return Constraint("choice", choices=tuple(value))
    if name == "guided_json":
        return Constraint("json_schema", value if isinstance(value, str) else json.dumps(value))
    kind = value.get("type")
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict | bool):
            raise InvalidRequest("json_schema needs {\"schema\": {...}}")
        return Constraint("json_schema", json.dumps(spec["schema"]))
    raise InvalidRequest(f"type must be text, json_object or json_schema, got {kind!r}")
