"""Shared-memory kvstore backend: each value is one immutable POSIX shared-memory segment owned by
this process, so that a reader on the same host reads it straight from /dev/shm (the Get reply
carries the segment name and length instead of the bytes); other readers get bytes as from any
backend. TTL, byte budget and eviction order are the memory backend's (the shared Ledger).

Segment lifecycle: written whole before the value is visible, never changed, named
`<prefix>.<pid namespace>.<pid>.<process start>.<random>` (services/common/shm.py; names are never
reused, so a descriptor of a value that is gone finds nothing, never other bytes) and unlinked when
the value is replaced, deleted, evicted or expired (on the next put, stats or reaper tick) and at
shutdown. A kvstore killed before it could unlink leaves its segments behind: the reaper, at start
and every `reap_seconds`, unlinks the segments of the prefix whose creator no longer runs."""

from __future__ import annotations

import asyncio
import logging

from services.common import shm
from services.common.errors import BackendUnavailable, KvCorrupted, UnknownRequest
from services.common.tasks import TaskSet
from services.kvstore.backend import StoreStats, ValueLocation, check_fits
from services.kvstore.ledger import Ledger

log = logging.getLogger(__name__)


class ShmBackend:
    """Made inside the running event loop (its reaper is a task); `close` unlinks every segment."""

    def __init__(self, byte_budget: int, prefix: str, reap_seconds: float) -> None:
        self._ledger: Ledger[str] = Ledger(byte_budget)  # handle: the value's segment name
        self._prefix = shm.check_prefix(prefix)
        self._closed = False
        self._tasks = TaskSet()
        shm.reap_orphans(prefix)
        self._tasks.spawn(self._maintain(reap_seconds), f"{prefix}-reaper")

    async def put(self, namespace: str, key: str, value: bytes, ttl_seconds: float) -> int:
        check_fits(value, self._ledger.byte_budget)
        self._check_open()
        try:
            name = await self._write(value)
        except OSError as exc:  # ENOSPC: /dev/shm is full
            raise BackendUnavailable(f"shared memory refused a {len(value)}-byte value: {exc}") from exc
        if self._closed:  # shut down while writing: nothing may outlive the store
            shm.unlink(name)
            self._check_open()
        admission = self._ledger.admit(namespace, key, name, len(value), ttl_seconds)
        self._unlink(admission.dropped)
        return admission.evicted

    async def _write(self, value: bytes) -> str:
        """The value's new segment. A large one is written in a worker thread, which a cancelled
        put (its caller went away) cannot stop: the segment is then unlinked once written."""
        if len(value) < shm.THREAD_FROM_BYTES:
            return shm.write_segment(self._prefix, value)
        writing = asyncio.get_running_loop().run_in_executor(None, shm.write_segment, self._prefix, value)
        try:
            return await asyncio.shield(writing)
        except asyncio.CancelledError:
            writing.add_done_callback(_unlink_if_written)
            raise

    async def get(self, namespace: str, key: str) -> bytes:
        name, size = self._find(namespace, key)
        try:
            return await shm.off_loop(size, shm.read_segment, name, size)
        except (FileNotFoundError, ValueError) as exc:
            raise self._lost(namespace, key, name, exc) from exc

    async def locate(self, namespace: str, key: str) -> ValueLocation | None:
        name, size = self._find(namespace, key)
        if not (shm.SHM_DIR / name).exists():
            raise self._lost(namespace, key, name, FileNotFoundError(name))
        return ValueLocation(name, size)

    async def delete(self, namespace: str, keys: list[str], prefix: str) -> int:
        removed = self._ledger.remove(namespace, keys, prefix)
        self._unlink(removed)
        return len(removed)

    async def stats(self) -> StoreStats:
        self._check_open()
        self._unlink(self._ledger.sweep())
        return self._ledger.stats("shm")

    async def close(self) -> None:
        self._closed = True
        await self._tasks.cancel_all()
        self._unlink(self._ledger.drain())

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable("the shm kvstore backend is shut down")

    def _find(self, namespace: str, key: str) -> tuple[str, int]:
        found = self._ledger.find(namespace, key)
        if found is None:
            raise UnknownRequest(f"key {key!r} not found in namespace {namespace!r}")
        return found

    def _lost(self, namespace: str, key: str, name: str, error: Exception) -> Exception:
        """The error for a value whose segment could not be read: NOT_FOUND when the value went
        meanwhile (deleted, replaced), else its segment was removed or changed from outside."""
        if not self._ledger.forget(namespace, key, name):
            return UnknownRequest(f"key {key!r} not found in namespace {namespace!r}")
        shm.unlink(name)
        log.error("value %r of namespace %r lost: its segment %s was removed or changed outside the kvstore (%s)",
                  key, namespace, name, error)
        return KvCorrupted(f"value {key!r} lost: its shared-memory segment was removed or changed outside "
                           f"the kvstore ({error})")

    def _unlink(self, names: list[str]) -> None:
        for name in names:
            shm.unlink(name)

    async def _maintain(self, reap_seconds: float) -> None:
        """Expire values and reap the segments of dead kvstores, every `reap_seconds`."""
        while True:
            await asyncio.sleep(reap_seconds)
            try:
                self._unlink(self._ledger.sweep())
                await asyncio.to_thread(shm.reap_orphans, self._prefix)
            except OSError as exc:  # e.g. a segment of another user: try again next tick
                log.warning("shared-memory upkeep failed: %s", exc)


def _unlink_if_written(writing: asyncio.Future[str]) -> None:
    if not writing.cancelled() and writing.exception() is None:
        shm.unlink(writing.result())
