"""API keys: when the gateway is given keys, the HTTP API (Authorization: Bearer KEY) and the gRPC
API (metadata `authorization: Bearer KEY`, or `x-api-key: KEY`) require one of them."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from pathlib import Path

from services.common.config import split_addresses
from services.common.errors import Unauthenticated

log = logging.getLogger(__name__)


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(dict.fromkeys(key for key in keys if key))

    @classmethod
    def from_settings(cls, keys: str, keys_file: str) -> ApiKeys:
        """Keys from a comma separated list and/or a file with one key per line ('#' comments)."""
        found = split_addresses(keys)
        if keys_file:
            lines = Path(keys_file).read_text().splitlines()
            found += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return cls(found)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def announce(self) -> None:
        if self.enabled:
            log.info("API keys required (%d configured)", len(self._keys))
        else:
            log.warning("no API keys configured: the HTTP and gRPC APIs are open to anyone who can reach them")

    def check(self, presented: str | None) -> None:
        """Raise Unauthenticated unless keys are off or `presented` is one of them."""
        if not self.enabled:
            return
        if not presented:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        if not any(hmac.compare_digest(presented.encode(), key.encode()) for key in self._keys):
            raise Unauthenticated("invalid API key")

    def check_metadata(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        headers = {key.lower(): value for key, value in metadata if isinstance(value, str)}
        self.check(bearer(headers.get("authorization")) or headers.get("x-api-key"))


def bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None
