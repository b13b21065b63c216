"""The prefix cache as the prefill engine uses it: look a prompt up in memory and then in the
kvstore tier, plan which computed blocks to keep, and keep them in the background after the first
token went out (best effort: a failure only loses the cache entry). The request ends only once this
worker's cache holds them, so a repeat sent the moment the answer ends finds them; the kvstore copy
goes on after."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import torch

from services.common.tasks import TaskSet
from services.prefill.prefix_cache import PrefixCache, PrefixHit, Recorded
from services.prefill.prefix_store import PrefixStore

log = logging.getLogger(__name__)


class PrefixReuse:
    def __init__(self, cache: PrefixCache, store: PrefixStore | None = None) -> None:
        self.cache = cache
        self._store = store  # the kvstore tier
        cache.store_tier = store is not None
        self._tasks = TaskSet()

    async def lookup(self, prompt: Sequence[int], salt: str, reuse: bool, unit: int) -> PrefixHit:
        """The prompt's cached leading blocks, held here or else in the kvstore, a whole number of
        `unit` tokens (none when `reuse` is off, but the keys to store)."""
        hit = self.cache.held(prompt, salt, reuse)
        loaded: list[torch.Tensor] = []
        if reuse and self._store is not None and len(hit.blocks) < len(hit.keys):
            missing = hit.keys[len(hit.blocks) :]
            loaded = await self._store.load(missing)
            if loaded:
                self.cache.insert(list(zip(missing, loaded)), hit.keys)
                hit = PrefixHit(hit.keys, hit.blocks + loaded, hit.block_size)
        return self.cache.settle(hit, unit, reuse, len(loaded))

    def plan(self, hit: PrefixHit) -> tuple[list[int], tuple[int, int] | None]:
        """The blocks the forward pass should yield for keeping, and the token rows to record for them."""
        wanted = self.cache.wanted(hit)
        return wanted, self.cache.rows(wanted)

    def keep(self, hit: PrefixHit, wanted: list[int], recorded: Recorded, name: str) -> asyncio.Event:
        """Store the recorded blocks, in the background; the event is set once this worker's cache
        holds them (or keeping them failed)."""
        cached = asyncio.Event()
        self._tasks.spawn(self._keep(hit, wanted, recorded, cached), name)
        return cached

    async def _keep(self, hit: PrefixHit, wanted: list[int], recorded: Recorded, cached: asyncio.Event) -> None:
        try:
            blocks = await asyncio.to_thread(self.cache.make_blocks, hit, wanted, recorded)
            self.cache.insert(blocks, hit.keys)
            cached.set()
            if self._store is not None:  # for the other prefill workers, and after a restart
                await self._store.save(blocks)
        except Exception:  # noqa: BLE001 - best effort
            log.exception("could not store prompt blocks in the prefix cache")
        finally:
            cached.set()

    async def close(self) -> None:
        await self._tasks.cancel_all()
