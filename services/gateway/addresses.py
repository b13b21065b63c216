"""Where the gateway's worker addresses come from.

- The address list (`--prefill-addresses`, `--decode-addresses`): host:port entries. A DNS name
  stands for every address it resolves to (`docker compose --scale`, a headless Kubernetes
  service) and is resolved again on every refresh.
- The address file (`--prefill-addresses-file`, `--decode-addresses-file`): one host:port a line,
  '#' starts a comment; typically a mounted ConfigMap. Its path is stat'ed on every refresh (a
  ConfigMap update swaps a symlink, so the path, not an open file, is what counts) and it is read
  again when its inode, mtime or size changed; a file that cannot be read or parsed keeps the last
  good list. Its names are resolved like the list's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from services.common.targets import ipv4_first, is_ip, join_host_port, split_host_port

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_SECONDS = 5.0  # one DNS lookup; past it the name keeps its last addresses


def parse_address_lines(text: str, origin: str) -> list[str]:
    """The host:port entries of an address file; ValueError names the first bad line."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            try:
                split_host_port(entry)
            except ValueError as exc:
                raise ValueError(f"{origin} line {number}: {exc}") from None
            found.append(entry)
    return found


@dataclass(slots=True)
class AddressFile:
    """An address file, read again when it changes."""

    path: str
    _signature: tuple[int, int, int] | None = None
    _text: str | None = None
    _addresses: list[str] = field(default_factory=list)
    _problem: str = ""

    def read(self) -> list[str]:
        """The file's addresses (the last good list while it cannot be read or parsed)."""
        try:
            stat = os.stat(self.path)  # follows the symlink a ConfigMap update replaces
            signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if signature != self._signature:
                self._load(Path(self.path).read_text())
                self._signature = signature
            self._problem = ""
        except (OSError, ValueError) as exc:
            if str(exc) != self._problem:  # say it once, not on every refresh
                log.warning("address file %s: %s; keeping %s", self.path, exc, self._addresses)
                self._problem = str(exc)
        return list(self._addresses)

    def _load(self, text: str) -> None:
        if text != self._text:
            self._addresses = parse_address_lines(text, self.path)
            self._text = text
            log.info("address file %s lists %s", self.path, self._addresses or "no workers")


class AddressSource:
    """One role's worker addresses: the list and the file, every name resolved."""

    def __init__(self, role: str, listed: list[str], file: str = "") -> None:
        self.role = role
        self._listed = [split_host_port(address) for address in listed]
        self._file = AddressFile(file) if file else None
        self._resolved: dict[tuple[str, str], list[str]] = {}

    async def addresses(self) -> list[str]:
        entries = list(self._listed)
        if self._file is not None:
            entries += [split_host_port(address) for address in self._file.read()]
        found: list[str] = []
        for host, port in dict.fromkeys(entries):
            found += await self._resolve(host, port)
        return list(dict.fromkeys(found))

    async def _resolve(self, host: str, port: str) -> list[str]:
        """Every address a name stands for (IPv4 first); its last answer, or the name itself, if
        the lookup fails."""
        if is_ip(host):
            return [join_host_port(host, port)]
        try:
            infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
                host, int(port), type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_SECONDS)
        except (OSError, TimeoutError) as exc:
            log.warning("cannot resolve %s worker %s: %s", self.role, host, str(exc) or "timed out")
            return self._resolved.get((host, port), [join_host_port(host, port)])
        self._resolved[(host, port)] = [join_host_port(ip, port) for ip in ipv4_first(infos)]
        return self._resolved[(host, port)]
