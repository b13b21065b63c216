"""Names of KV blocks for prefix caching: a chained hash over full blocks of tokens, as vLLM names its
blocks, so equal prefixes have equal names on every worker and any client can compute them.

Block i (tokens [i * block_size, (i + 1) * block_size) of the prompt; only full blocks are named) is

    key_i = SHA-256( key_{i-1}                      32 raw bytes; nothing for block 0
                   || u16le(len(fingerprint)) || fingerprint   the model's (ModelInfo.fingerprint), UTF-8
                   || u16le(len(salt)) || salt                 the cache salt, UTF-8 (may be empty)
                   || token ids of the block as u32le )

written as 64 lowercase hex digits. The chain makes a block's name depend on every token before it;
the fingerprint keeps models apart; the salt keeps tenants apart (the gateway gives each API key its
own unless sharing is turned on, and a request may add its own `cache_salt`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from services.common.errors import InvalidRequest

MAX_SALT_BYTES = 256


def check_salt(salt: object) -> str:
    """A cache salt: a string of at most MAX_SALT_BYTES bytes (InvalidRequest otherwise)."""
    if not isinstance(salt, str):
        raise InvalidRequest(f"cache_salt must be a string, got {type(salt).__name__}")
    try:
        size = len(salt.encode())
    except UnicodeEncodeError:  # a lone surrogate (JSON allows "\ud800")
        raise InvalidRequest("cache_salt must be valid Unicode text") from None
    if size > MAX_SALT_BYTES:
        raise InvalidRequest(f"cache_salt must be at most {MAX_SALT_BYTES} bytes, got {size}")
    return salt


def _field(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<H", len(data)) + data


def block_keys(token_ids: Sequence[int], block_size: int, fingerprint: str, salt: str = "") -> list[str]:
    """The names of the full blocks of `token_ids`, first block first."""
    head = _field(fingerprint) + _field(check_salt(salt))
    parent, keys = b"", []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        digest = hashlib.sha256(parent + head + struct.pack(f"<{len(block)}I", *block))
        parent = digest.digest()
        keys.append(digest.hexdigest())
    return keys
