"""Input checks shared by every edge (gateway gRPC and HTTP, prefill, decode), in one place, so a
value refused at one door is refused at every door. Each raises InvalidRequest naming the field.

Sampling parameters validate themselves (`Sampling.__post_init__`, which uses the temperature check
below); KV chunk contents are checked by the assembler (`kv_assembly`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from services.common.errors import InvalidRequest

# Below this (and above 0) logits / temperature can overflow float32 to infinity and softmax turns
# it into NaN: refused rather than clamped, so a client learns that 0 means greedy.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0
MB = 1024 * 1024
_MAX_BUDGET_BYTES = 2**62  # any budget above this is as good as none
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_temperature(value: float) -> None:
    if not (value == 0 or MIN_TEMPERATURE <= value <= MAX_TEMPERATURE):  # NaN fails both
        raise InvalidRequest(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                             f"got {value}")


def check_budget_mb(value: float) -> None:
    """A per-request KV budget in MB: finite and >= 0 (0 means the worker's default)."""
    if not (math.isfinite(value) and value >= 0):
        raise InvalidRequest(f"max_cache_budget_mb must be a finite number >= 0, got {value}")


def budget_bytes(megabytes: float) -> int:
    """A checked budget in bytes; a huge finite budget saturates instead of overflowing."""
    check_budget_mb(megabytes)
    return int(min(megabytes * MB, _MAX_BUDGET_BYTES))


def check_id(field: str, value: str, required: bool = True) -> None:
    """A request id or label: 1-64 letters, digits, '-' or '_' (it names store keys and log lines),
    or empty where not `required`."""
    if (value or required) and not _ID.match(value):
        raise InvalidRequest(f"{field} must be 1-64 letters, digits, '-' or '_'")


def check_token_ids(field: str, token_ids: Sequence[int], vocab_size: int) -> None:
    """Every id is a token of the model's vocabulary (an id past it would crash the embedding)."""
    for index, token in enumerate(token_ids):
        if not 0 <= token < vocab_size:
            raise InvalidRequest(f"{field}[{index}] = {token} is outside the model's vocabulary of {vocab_size}")
