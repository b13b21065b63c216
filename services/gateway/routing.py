"""Worker membership and choice: each configured address (a DNS name may stand for several
workers, as with `docker compose --scale`) is resolved into workers; the gateway counts the
requests it has on each and picks the least loaded."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from services.common.errors import BackendUnavailable

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Worker:
    address: str
    role: str
    active: int = 0


def _split(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"worker address {address!r} is not host:port")
    return host.strip("[]"), port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _join(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class WorkerPool:
    def __init__(self, role: str, addresses: list[str]) -> None:
        self.role = role
        self._seeds = [_split(address) for address in addresses]
        self._workers: dict[str, Worker] = {}
        self._turn = itertools.count()
        for host, port in self._seeds:  # usable before the first DNS refresh
            address = _join(host, port)
            self._workers[address] = Worker(address, role)

    @property
    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    async def refresh(self) -> None:
        """Resolve every configured name again; keep counts of workers still present."""
        found: list[str] = []
        for host, port in self._seeds:
            found.extend(await self._resolve(host, port))
        if not found:
            return
        self._workers = {address: self._workers.get(address) or Worker(address, self.role)
                         for address in dict.fromkeys(found)}

    async def _resolve(self, host: str, port: str) -> list[str]:
        if _is_ip(host):
            return [_join(host, port)]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cannot resolve %s worker %s: %s", self.role, host, exc)
            return [_join(host, port)] if any(w.address == _join(host, port) for w in self.workers) else []
        ipv4 = [info[4][0] for info in infos if info[0] == socket.AF_INET]
        ips = ipv4 or [info[4][0] for info in infos]
        return [_join(ip, port) for ip in dict.fromkeys(ips)]

    def ranked(self) -> list[Worker]:
        """Workers from least to most loaded; ties rotate so load spreads."""
        workers = self.workers
        if not workers:
            raise BackendUnavailable(f"no {self.role} workers")
        offset = next(self._turn) % len(workers)
        rotated = workers[offset:] + workers[:offset]
        return sorted(rotated, key=lambda worker: worker.active)

    @staticmethod
    @contextmanager
    def lease(worker: Worker) -> Iterator[Worker]:
        """Count a request on `worker` while the context is open."""
        worker.active += 1
        try:
            yield worker
        finally:
            worker.active -= 1
