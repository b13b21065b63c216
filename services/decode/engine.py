"""The decode engine: admission, KV assembly into the paged pool, and one continuous-batching loop.

Life of a request, as a sequence of queues:
  admit (reject above the reject threshold or when the prompt's blocks do not fit; else reserve
  the prompt's blocks)                                                        -> AWAITING_KV
  -> its KV lands straight in those blocks: a TransferKv stream from a prefill worker, the
     kvstore, or a local prefill (unified mode); every chunk is verified      -> READY queue
  -> the loop: schedule (resume preempted sequences, join ready ones, grow blocks, preempt the
     newest sequences above the preempt threshold) -> run (one batched forward for every
     running sequence, on the model thread) -> postprocess (append, stream, finish and free)
  -> finished (EOS, max_tokens), failed (bad KV, KV timeout) or cancelled; however it ends, its
     blocks return to the pool and its stored KV is deleted.
Preempted sequences swap their KV to the kvstore (or drop it, to be recomputed by a local
prefill) and resume, oldest first, once the pool is below the preempt threshold again.

Spans: `kv.handoff` (prefill forward end -> sequence ready here; kv.handoff_ms, kv.bytes; the two
ends use different hosts' clocks) and `decode.preempt` / `decode.resume` events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from opentelemetry import trace

from services.common.errors import (BackendUnavailable, CapacityExhausted, DeadlineExceeded, InvalidRequest,
                                    KvProtocolError, UnknownRequest)
from services.common.kv_codec import KvAssembler, KvReceipt
from services.common.kvstore_client import KvStoreClient
from services.common.metrics import DecodeLoad, DecodeMetrics
from services.common.model_thread import ModelThread
from services.common.runtime import ModelRuntime
from services.common.sampling import Sampling, sample
from services.common.tasks import TaskSet
from services.common.telemetry import perf_to_unix_nanos
from services.decode.blocks import BlockManager, BlockPool, PoolConfig
from services.decode.paged_runner import PagedRunner, StepSlot
from services.decode.sequence import Event, Finished, PoolTarget, Sequence, State, Token
from services.decode.swap import KvSwapper

log = logging.getLogger(__name__)
tracer = trace.get_tracer("disagg.decode")

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    kv_timeout_seconds: float
    max_chunk_bytes: int
    max_active_requests: int
    max_batch_size: int
    reject_threshold: float  # pool pressure above which new requests are refused
    preempt_threshold: float  # pool pressure above which running sequences are preempted
    max_cache_budget_mb: float = 0.0  # default per-request KV budget (0: none)


class DecodeEngine:
    def __init__(self, runtime: ModelRuntime, thread: ModelThread, pool: PoolConfig, limits: DecodeLimits,
                 store: KvStoreClient | None, metrics: DecodeMetrics) -> None:
        self._runtime = runtime
        self._thread = thread
        self._limits = limits
        self._store = store
        self._metrics = metrics
        self._pool = BlockPool(pool, runtime.geometry, runtime.device)
        self.blocks = BlockManager(pool)
        self._runner = PagedRunner(runtime, self._pool)
        self._swapper = KvSwapper(runtime, thread, self._pool, self.blocks, store, limits.max_chunk_bytes)
        self.sequences: dict[str, Sequence] = {}
        self._ready: deque[Sequence] = deque()
        self._preempted: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._in_step: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks = TaskSet()
        self.requests_total = 0
        self.preemptions_total = 0

    def start(self) -> None:
        self._tasks.spawn(self._loop(), "decode-loop")

    # admission and KV arrival -------------------------------------------------------------
    def admit(self, request_id: str, prompt_ids: list[int], sampling: Sampling, position_offset: int = 0,
              budget_mb: float = 0.0) -> Sequence:
        if not request_id:
            raise InvalidRequest("request_id must not be empty")
        if request_id in self.sequences:
            raise InvalidRequest(f"request {request_id!r} is already active on this worker")
        if not prompt_ids:
            raise InvalidRequest("prompt_token_ids must not be empty")
        if len(prompt_ids) + sampling.max_tokens - position_offset > self._runtime.geometry.max_model_len:
            raise InvalidRequest(f"prompt ({len(prompt_ids)}) + max_tokens ({sampling.max_tokens}) exceeds the "
                                 f"model's context of {self._runtime.geometry.max_model_len}")
        if len(self.sequences) >= self._limits.max_active_requests:
            raise CapacityExhausted(f"decode worker is full ({self._limits.max_active_requests} active requests)")
        if self.blocks.pressure > self._limits.reject_threshold:  # checked before anything is reserved
            raise CapacityExhausted(f"KV pool pressure {self.blocks.pressure:.2f} is above the reject threshold")
        self.blocks.allocate(request_id, len(prompt_ids))
        budget = budget_mb or self._limits.max_cache_budget_mb
        if budget < 0:
            raise InvalidRequest(f"max_cache_budget_mb must be >= 0, got {budget}")
        sequence = Sequence(request_id, prompt_ids, sampling, position_offset, int(budget * 1024 * 1024))
        self.sequences[request_id] = sequence
        self.requests_total += 1
        asyncio.get_running_loop().call_later(self._limits.kv_timeout_seconds, self._kv_deadline, sequence)
        return sequence

    def _kv_deadline(self, sequence: Sequence) -> None:
        if sequence.state is State.AWAITING_KV:
            self._fail(sequence, DeadlineExceeded(f"KV did not arrive within {self._limits.kv_timeout_seconds}s"))

    def begin_transfer(self, request_id: str) -> KvAssembler:
        """An assembler writing the request's KV into its blocks; one transfer per request."""
        sequence = self.sequences.get(request_id)
        if sequence is None or sequence.state is not State.AWAITING_KV:
            raise UnknownRequest(f"no request {request_id!r} is waiting for KV on this worker")
        if sequence.transfer_started:
            raise KvProtocolError(f"request {request_id!r} already has a KV transfer")
        sequence.transfer_started = True
        return KvAssembler(request_id, self._runtime.geometry, len(sequence.prompt_ids),
                           self._limits.max_chunk_bytes, PoolTarget(self._pool, self.blocks.tables[request_id]))

    def complete(self, request_id: str, receipt: KvReceipt) -> None:
        sequence = self.sequences.get(request_id)
        if sequence is None or sequence.state is not State.AWAITING_KV:
            return
        sequence.kv_bytes_received = receipt.byte_count
        self._metrics.kv_bytes_received.inc(receipt.byte_count)
        self._record_handoff(receipt)
        self._first_token(sequence, receipt.first_token)

    def fail(self, request_id: str, error: Exception) -> None:
        sequence = self.sequences.get(request_id)
        if sequence is not None and sequence.state is State.AWAITING_KV:
            self._fail(sequence, error)

    def _fail(self, sequence: Sequence, error: Exception) -> None:
        sequence.state = State.FINISHED
        sequence.events.put_nowait(error)

    async def load_from_store(self, sequence: Sequence) -> None:
        """Take the request's KV from the kvstore instead of a direct stream."""
        if self._store is None:
            raise BackendUnavailable("this decode worker has no kvstore (--kvstore-address)")
        assembler = self.begin_transfer(sequence.request_id)
        try:
            receipt = await self._swapper.load(sequence.request_id, assembler)
        except Exception as error:
            self.fail(sequence.request_id, error)
            raise
        self.complete(sequence.request_id, receipt)

    async def prefill_locally(self, sequence: Sequence) -> None:
        """Unified mode: compute the prompt's KV here; the first token is streamed too."""
        blocks = self.blocks.tables[sequence.request_id]
        sequence.transfer_started = True
        logits = await self._thread.run(self._runtime.prefill, sequence.prompt_ids,
                                        lambda layer, k, v: self._pool.write(blocks, layer, 0, k, v))
        first = await asyncio.to_thread(sample, logits, sequence.sampling, sequence.position_offset)
        if sequence.state is State.AWAITING_KV:
            sequence.events.put_nowait(Token(first, sequence.position_offset))
            self._first_token(sequence, first)

    def _first_token(self, sequence: Sequence, token: int) -> None:
        sequence.generated.append(token)
        if self._finish(sequence) is None:
            sequence.state = State.READY
            self._ready.append(sequence)
            self._wake.set()

    def _record_handoff(self, receipt: KvReceipt) -> None:
        now = perf_to_unix_nanos(time.perf_counter())
        start = min(receipt.forward_end_unix_nanos or now, now)
        latency = (now - start) / 1e9
        tracer.start_span("kv.handoff", start_time=start, attributes={
            "kv.handoff_ms": latency * 1e3, "kv.bytes": receipt.byte_count}).end(end_time=now)
        self._metrics.handoff_seconds.observe(latency)

    async def events(self, sequence: Sequence) -> AsyncIterator[Token | Finished]:
        """What the request's Generate stream sends, until Finished. Raises the request's error."""
        while True:
            event: Event = await sequence.events.get()
            if isinstance(event, Exception):
                raise event
            yield event
            if isinstance(event, Finished):
                return

    # the loop -----------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while batch := await self._schedule():
                self._in_step = {sequence.request_id for sequence in batch}
                try:
                    step = await self._thread.run_timed(self._step, batch)
                finally:
                    self._in_step = set()
                self._metrics.time_per_output_token.observe(step.run_seconds)
                self._postprocess(batch, step.value)

    async def _schedule(self) -> list[Sequence]:
        preempt_at = self._limits.preempt_threshold
        while (waiting := self._next_to_resume()) and self._fits_below(waiting.kv_tokens + 1, preempt_at):
            self._preempted.remove(waiting)
            await self._resume(waiting)
        while self._ready and len(self._running) < self._limits.max_batch_size:
            sequence = self._ready.popleft()
            if sequence.state is State.READY:
                sequence.state = State.RUNNING
                self._running.append(sequence)
        for sequence in sorted(self._running, key=lambda s: s.admitted_at):
            while sequence.state is State.RUNNING and not self._grow(sequence):
                await self._preempt(max(self._running, key=lambda s: s.admitted_at))
        while self.blocks.pressure > preempt_at and len(self._running) > 1:
            await self._preempt(max(self._running, key=lambda s: s.admitted_at))
        per_token = self._runtime.geometry.kv_bytes_per_token
        for sequence in [s for s in self._running if s.over_budget(per_token)]:
            if len(self._running) > 1 or self._ready:  # over budget yields to others, never to nobody
                await self._preempt(sequence)
        return list(self._running)

    def _next_to_resume(self) -> Sequence | None:
        """Oldest preempted sequence; one over its KV budget only when nothing else waits or runs."""
        per_token = self._runtime.geometry.kv_bytes_per_token
        for sequence in self._preempted:
            if not sequence.over_budget(per_token):
                return sequence
        if self._preempted and not self._running and not self._ready:
            return self._preempted[0]
        return None

    def _fits_below(self, tokens: int, threshold: float) -> bool:
        """Whether `tokens` more tokens of KV keep the pool at or under `threshold` (no thrashing:
        a resumed sequence must not push the pool straight back over the preempt threshold)."""
        needed = self.blocks.blocks_for(tokens)
        if not self.blocks.can_fit(tokens):
            return False
        return (self.blocks.used + needed) / self.blocks.total <= threshold or not self._running

    def _grow(self, sequence: Sequence) -> bool:
        try:
            self.blocks.ensure(sequence.request_id, sequence.kv_tokens + 1)
            return True
        except CapacityExhausted:
            return False

    def _step(self, batch: list[Sequence]) -> list[int]:
        slots = [StepSlot(self.blocks.tables[s.request_id], s.kv_tokens, s.generated[-1]) for s in batch]
        logits = self._runner.step(slots)
        return [sample(logits[row], s.sampling, s.completion_index) for row, s in enumerate(batch)]

    def _postprocess(self, batch: list[Sequence], tokens: list[int]) -> None:
        for sequence, token in zip(batch, tokens):
            if sequence.state is not State.RUNNING:  # released while the step ran
                self.blocks.free(sequence.request_id)
                continue
            sequence.generated.append(token)
            sequence.events.put_nowait(Token(token, sequence.completion_index - 1))
            self._finish(sequence)

    def _finish(self, sequence: Sequence) -> str | None:
        token, produced = sequence.generated[-1], sequence.completion_index
        reason = None
        if not sequence.sampling.ignore_eos and token in self._runtime.geometry.eos_token_ids:
            reason = FINISH_STOP
        elif produced >= sequence.sampling.max_tokens:
            reason = FINISH_LENGTH
        if reason is not None:
            sequence.events.put_nowait(Finished(reason, produced))
            self._leave(sequence)
        return reason

    def _leave(self, sequence: Sequence) -> None:
        """Take the sequence out of every queue and give its blocks back (after an in-flight step)."""
        sequence.state = State.FINISHED
        if sequence in self._running:
            self._running.remove(sequence)
        if sequence.request_id not in self._in_step:
            self.blocks.free(sequence.request_id)

    # preemption ---------------------------------------------------------------------------
    async def _preempt(self, sequence: Sequence) -> None:
        self._running.remove(sequence)
        sequence.state = State.PREEMPTED
        with tracer.start_as_current_span("decode.preempt", attributes={"request.id": sequence.request_id,
                                                                        "kv.tokens": sequence.kv_tokens}):
            await self._swapper.swap_out(sequence)
        self.blocks.free(sequence.request_id)
        self._preempted.append(sequence)
        self.preemptions_total += 1
        log.info("preempted %s (%d tokens of KV); pool pressure now %.2f", sequence.request_id,
                 sequence.kv_tokens, self.blocks.pressure)

    async def _resume(self, sequence: Sequence) -> None:
        if sequence.state is not State.PREEMPTED:
            return
        self.blocks.allocate(sequence.request_id, sequence.kv_tokens + 1)
        with tracer.start_as_current_span("decode.resume", attributes={"request.id": sequence.request_id}):
            await self._swapper.swap_in(sequence)
        sequence.state = State.READY
        self._ready.append(sequence)

    # end of a request ---------------------------------------------------------------------
    def release(self, sequence: Sequence) -> None:
        """Drop everything the request holds, however it ended."""
        if self.sequences.get(sequence.request_id) is sequence:
            del self.sequences[sequence.request_id]
        for queue in (self._ready, self._preempted):
            if sequence in queue:
                queue.remove(sequence)
        self._leave(sequence)
        self._wake.set()  # freed blocks may let a preempted sequence resume
        if self._store is not None:
            self._tasks.spawn(self._swapper.forget(sequence.request_id), f"forget-{sequence.request_id}")

    def load(self) -> DecodeLoad:
        sequences = list(self.sequences.values())
        awaiting = sum(s.state is State.AWAITING_KV for s in sequences)
        block_bytes = self._runtime.geometry.kv_bytes_per_token * self.blocks.block_size
        return DecodeLoad(len(sequences), awaiting, len(self._running), self.blocks.used * block_bytes,
                          self.blocks.pressure)

    async def close(self) -> None:
        await self._tasks.cancel_all()
