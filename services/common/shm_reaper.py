"""The reaper of a service's shared-memory segments: at start and then on a timer it unlinks the
segments of its prefix whose creator is gone (a worker killed mid-transfer cannot unlink its own)."""

from __future__ import annotations

import asyncio
import logging

from services.common import shm
from services.common.tasks import TaskSet

log = logging.getLogger(__name__)


class ShmReaper:
    def __init__(self, prefix: str, interval_seconds: float) -> None:
        self._prefix = shm.check_prefix(prefix)
        self._interval = interval_seconds
        self._tasks = TaskSet()
        self.reaped_total = 0

    def start(self) -> None:
        """Reap once now (before the service takes work), then every interval (a tracked task)."""
        self.reap()
        self._tasks.spawn(self._every_interval(), f"shm-reaper-{self._prefix}")

    def reap(self) -> list[str]:
        reaped = shm.reap_orphans(self._prefix)
        self.reaped_total += len(reaped)
        return reaped

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self.reap()
            except Exception as error:  # noqa: BLE001 - the next round tries again
                log.warning("reaping shared-memory segments of %s failed: %s", self._prefix, error)

    async def stop(self) -> None:
        await self._tasks.cancel_all()
