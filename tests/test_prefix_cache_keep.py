"""The prefill's prefix cache holds a prompt's blocks by the time the request ends: a repeat sent
the moment the answer arrives finds them (the copy into the cache runs while the KV streams, and the
request's end waits for it). Without that wait, a repeat on a busy worker raced the copy and
computed the whole prompt again. The wait is not the handoff's: kv.handoff_seconds still ends at the
decode's acknowledgement."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from services.common.kv_codec import ChunkSource, KvChunk, KvEnd, KvLayout
from services.common.metrics import PrefillMetrics
from services.common.model_thread import ModelThread
from services.common.runtime import ModelGeometry, ModelRuntime
from services.common.sampling import Sampling
from services.prefill.engine import ChunkGeometry, PrefillEngine, PrefillJob
from services.prefill.prefix_cache import PrefixCache, PrefixCacheMetrics
from services.prefill.prefix_reuse import PrefixReuse
from services.prefill.records import PrefillSummary

BLOCK = 16
COPY_SECONDS = 0.5  # the copy into the cache, as slow as a long prompt's on a busy machine


class ReceivedKv:
    """Where the engine sends the KV (the decode's stream in a worker): what arrived, in order."""

    def __init__(self) -> None:
        self.messages: list[KvLayout | KvChunk | KvEnd] = []

    async def place(self, source: ChunkSource) -> KvChunk | None:
        return None  # encoded once, as for any sink without a buffer of its own

    async def send(self, message: KvLayout | KvChunk) -> None:
        self.messages.append(message)

    async def close(self, end: KvEnd) -> None:
        self.messages.append(end)

    def abort(self) -> None:
        pass


def slow_cache(geometry: ModelGeometry) -> PrefixCache:
    """A prefix cache whose copy of a prompt's blocks takes COPY_SECONDS."""
    cache = PrefixCache(64 << 20, BLOCK, geometry.fingerprint, geometry.kv_bytes_per_token * BLOCK,
                        PrefixCacheMetrics.create(CollectorRegistry()))
    make_blocks = cache.make_blocks

    def slow_make_blocks(*args):  # type: ignore[no-untyped-def]
        time.sleep(COPY_SECONDS)
        return make_blocks(*args)

    cache.make_blocks = slow_make_blocks  # type: ignore[method-assign]
    return cache


async def test_the_handoff_ends_at_the_decodes_acknowledgement_not_at_the_cache_copy(tiny: ModelRuntime) -> None:
    """kv.handoff_seconds (forward end -> the decode holds verified KV) and the transfer's time do
    not include the wait for the prefix cache's copy, which only delays the request's end."""
    thread = ModelThread()
    metrics = PrefillMetrics.create(CollectorRegistry(), thread, lambda: 0)
    engine = PrefillEngine(tiny, thread, ChunkGeometry(BLOCK, 4, 4096), None, False, metrics, None,
                           PrefixReuse(slow_cache(tiny.geometry)))
    try:
        started = time.perf_counter()
        events = [event async for event in engine.run(PrefillJob("keep-2", list(range(10, 10 + 3 * BLOCK + 5)),
                                                                 Sampling(temperature=0.0), ReceivedKv(), False))]
        summary = events[-1]
        assert isinstance(summary, PrefillSummary)
        assert time.perf_counter() - started >= COPY_SECONDS  # the request's end waited for the copy
        assert summary.handoff_seconds < COPY_SECONDS / 2 and summary.transfer_seconds < COPY_SECONDS / 2
    finally:
        await engine.close()
        thread.shutdown()


async def test_a_request_ends_only_once_the_prefix_cache_holds_its_blocks(tiny: ModelRuntime) -> None:
    thread = ModelThread()
    cache = slow_cache(tiny.geometry)
    reuse = PrefixReuse(cache)
    metrics = PrefillMetrics.create(CollectorRegistry(), thread, lambda: 0)
    engine = PrefillEngine(tiny, thread, ChunkGeometry(BLOCK, 4, 4096), None, False, metrics, None, reuse)
    prompt = list(range(10, 10 + 3 * BLOCK + 5))  # three whole blocks to keep
    sink = ReceivedKv()
    try:
        events = [event async for event in engine.run(PrefillJob("keep-1", prompt, Sampling(temperature=0.0),
                                                                 sink, False))]
        assert isinstance(events[-1], PrefillSummary) and isinstance(sink.messages[-1], KvEnd)
        assert len(cache.held(prompt, "").blocks) == 3  # at the end, with no wait of our own
    finally:
        await engine.close()
        thread.shutdown()
