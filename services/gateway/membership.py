"""The gateway's live membership: which workers exist, which are serving, and whether the gateway
itself is ready.

- Addresses (services/gateway/addresses.py): the address lists, resolved again, and the address
  files, re-read when they change, every `--membership-refresh-seconds` (1 s).
- Health (services/gateway/health_watch.py): a Health/Watch stream per worker; a broken one is
  re-established after at most `--health-retry-max-seconds` (1 s).
- Choice and failures (services/gateway/routing.py): only serving workers are routed to.
- Readiness: the gateway's own health is SERVING only while it has a serving worker of each role
  it needs (no prefill worker in `--prefill-mode unified`), so a load balancer or Kubernetes
  readiness probe sends it traffic only when it can serve.

Scale-up: a worker whose address is known is watched before it listens, so its SERVING reaches
the gateway within ~1 s (channel reconnects at least every second; the watch retries at least
every second); a worker added to a file or DNS is watched within one refresh (1 s) and answers at
once. Either way it gets traffic within 2 s of turning SERVING.
"""

from __future__ import annotations

import asyncio
import logging

from services.common.backoff import Backoff
from services.common.channels import ChannelPool
from services.common.config import split_addresses
from services.common.metrics import WorkerRow
from services.common.server import Readiness
from services.common.tasks import TaskSet
from services.gateway.addresses import AddressSource
from services.gateway.health_watch import HealthTiming, HealthWatcher
from services.gateway.routing import WorkerPool, WorkerState
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
STATES = tuple(state.value for state in WorkerState)
HEALTH_RETRY_INITIAL_SECONDS = 0.1


class Membership:
    def __init__(self, settings: GatewaySettings, channels: ChannelPool, readiness: Readiness) -> None:
        self._tasks = TaskSet()
        self._readiness = readiness
        self._refresh_seconds = settings.membership_refresh_seconds
        timing = HealthTiming(settings.health_timeout_seconds,
                              Backoff(min(HEALTH_RETRY_INITIAL_SECONDS, settings.health_retry_max_seconds),
                                      settings.health_retry_max_seconds))
        watcher = HealthWatcher(channels, self._tasks, timing)
        failures = Backoff(settings.failure_backoff_seconds, settings.failure_backoff_max_seconds)
        self.prefill = WorkerPool("prefill", failures, watcher, self._changed)
        self.decode = WorkerPool("decode", failures, watcher, self._changed)
        # --prefill-mode unified uses no prefill worker: none is watched or needed
        self._needed = [self.decode] if settings.prefill_mode == "unified" else [self.prefill, self.decode]
        self._sources = [(pool, AddressSource(pool.role, split_addresses(getattr(settings, f"{pool.role}_addresses")),
                                              getattr(settings, f"{pool.role}_addresses_file")))
                         for pool in self._needed]

    @property
    def ready(self) -> bool:
        """A serving worker of every role the gateway needs."""
        return all(pool.serving for pool in self._needed)

    async def start(self) -> None:
        """Learn the addresses and start watching them; then keep refreshing."""
        await self.refresh()
        self._tasks.spawn(self._refresh_forever(), "membership-refresh")

    async def refresh(self) -> None:
        for pool, source in self._sources:
            pool.update(await source.addresses())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - one bad refresh must not end membership
                log.exception("membership refresh failed")

    def _changed(self) -> None:
        ready = self.ready
        if ready != self._readiness.ready:
            log.info("gateway %s", "ready: a worker of each role is serving" if ready else
                     f"not ready: no serving {' or '.join(p.role for p in self._needed if not p.serving)} worker")
        self._readiness.set(ready)

    def rows(self) -> list[WorkerRow]:
        """Every worker with its state (the /metrics gauges)."""
        return [WorkerRow(w.role, w.address, w.state.value, w.routable)
                for pool in (self.prefill, self.decode) for w in pool.workers]

    async def close(self) -> None:
        await self._tasks.cancel_all()
