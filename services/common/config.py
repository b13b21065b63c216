"""Typed service settings read from flags and environment variables.

Each service declares a slotted dataclass whose fields carry `setting(...)` metadata: help text
and the environment variable that also sets the field. `parse_settings` builds the argparse
parser from the dataclass (so `--help` lists every flag with its variable), and the dataclass's
`__post_init__` validates the values once, raising ValueError.

Precedence: flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar, get_type_hints

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def setting(default: Any, help: str, env: str) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field that is also a command-line flag and an environment variable."""
    return dataclasses.field(default=default, metadata={"help": help, "env": env})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _convert(kind: type, raw: str, env: str) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{env}={raw!r} is not a boolean")
    try:
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"{env}={raw!r} is not a valid {kind.__name__}") from exc


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind, env = hints[field.name], field.metadata["env"]
        help_text = f"{field.metadata['help']} [env {env}]"
        if kind is bool:
            parser.add_argument(_flag(field.name), dest=field.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(_flag(field.name), dest=field.name, type=kind, default=None,
                                metavar=field.name.upper(), help=help_text + f" (default: {field.default})")
    return parser


def parse_settings(cls: type[T], prog: str, description: str, argv: Sequence[str] | None = None,
                   environ: dict[str, str] | None = None) -> T:
    """Read `cls` from flags, then environment variables, then defaults. Raises ValueError."""
    environ = dict(os.environ if environ is None else environ)
    parsed = vars(build_parser(cls, prog, description).parse_args(argv))
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        env = field.metadata["env"]
        if parsed[field.name] is not None:
            values[field.name] = parsed[field.name]
        elif env in environ:
            values[field.name] = _convert(hints[field.name], environ[env], env)
    return cls(**values)


def split_addresses(value: str) -> list[str]:
    """'a:1, b:2' -> ['a:1', 'b:2']."""
    return [part.strip() for part in value.split(",") if part.strip()]


def check_port(name: str, port: int, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= port < 65536:
        raise ValueError(f"{name} must be in {low}..65535, got {port}")


def check_positive(name: str, value: float) -> None:
    if not 0 < value < math.inf:  # also refuses NaN
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
