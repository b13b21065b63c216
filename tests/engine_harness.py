"""The real decode engine in-process (tiny model, real pool, real model thread), no network: for
tests that inject faults into a step or a scheduler, or stage races between writers and frees."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry

from services.common.kv_assembly import AssemblyLimits
from services.common.kv_ingest import NativeIngest
from services.common.metrics import DecodeMetrics
from services.common.model_thread import ModelThread
from services.common.packed_weights import PackedWeights
from services.common.runtime import ModelRuntime
from services.common.sampling import Sampling
from services.common.model_files import default_cache_dir
from services.decode.admission import AdmissionLimits
from services.decode.native_attention import NativeAttention
from services.decode.pool import PoolConfig
from services.decode.engine import DecodeEngine, DecodeLimits, FastPaths
from services.decode.sequence import Sequence, Token

PROMPT = [1, 450, 7483, 310, 3444, 338]


class Harness:
    def __init__(self, runtime: ModelRuntime, blocks: int = 32, batch: int = 8, preempt: float = 0.85) -> None:
        self.thread = ModelThread()
        self.fatal: list[str] = []  # what the engine reported as fatal
        limits = DecodeLimits(kv_timeout_seconds=30, assembly=AssemblyLimits(2**24),
                              admission=AdmissionLimits(16, 0.95), max_batch_size=batch, preempt_threshold=preempt)
        # as the worker does by default: packed products, the C attention kernel and ingest where they build
        fast = FastPaths(PackedWeights.build(runtime.model, runtime.device, "batched"),
                         NativeAttention.build(runtime, default_cache_dir(), "auto"),
                         NativeIngest.build(default_cache_dir(), "auto"))
        self.engine = DecodeEngine(runtime, self.thread, PoolConfig(blocks, 16), limits, None,
                                   DecodeMetrics.create(CollectorRegistry(), self.thread), self.fatal.append, fast)

    def admit(self, name: str, prompt: list[int] = PROMPT, max_tokens: int = 6) -> Sequence:
        return self.engine.admit(Sequence(name, list(prompt), Sampling(temperature=0, max_tokens=max_tokens,
                                                                       ignore_eos=True)))

    async def tokens(self, sequence: Sequence) -> list[int]:
        """Every token the sequence streams (the first one included), until it finishes."""
        return [event.token_id async for event in self.engine.events(sequence) if isinstance(event, Token)]

    async def close(self) -> None:
        for sequence in list(self.engine.sequences.values()):
            self.engine.release(sequence)
        await self.engine.close()
        self.thread.shutdown()


@asynccontextmanager
async def started(runtime: ModelRuntime, **sizes: float) -> AsyncIterator[Harness]:
    """A harness whose engine loop runs, closed (every request released) on the way out."""
    harness = Harness(runtime, **sizes)  # type: ignore[arg-type]
    harness.engine.start()
    try:
        yield harness
    finally:
        await harness.close()
