"""The decode engine.

Life of a request, as a sequence of queues:
  Generate admits it (awaiting KV; the caller is told Accepted)
  -> its KV arrives: a TransferKv stream from a prefill worker, or the kvstore; a KvAssembler
     validates every message and copies each chunk into the request's KV tensors
  -> the complete KV becomes the sequence's cache (model thread)
  -> decode steps: each step is one job on the model thread's queue, so concurrent sequences
     interleave token by token (continuous batching replaces this in a later issue)
  -> finished (EOS or max_tokens), failed (bad KV, KV timeout) or cancelled by the caller
  -> released: the sequence and its KV are dropped and its stored transfer is deleted.

Spans (children of the `decode.Generate` server span): `kv.handoff` (from the prefill's forward
end, sent in the transfer's end message, to the sequence scheduled here; kv.handoff_ms, kv.bytes;
the two ends use different hosts' clocks) and `decode.generation` (tokens, time per output token).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
import time
from dataclasses import dataclass, field

from services.common.errors import (BackendUnavailable, CapacityExhausted, DeadlineExceeded, InvalidRequest,
                                    KvProtocolError, UnknownRequest)
from services.common.kv_codec import AssembledKv, KvAssembler, KvChunk, KvEnd, KvLayout
from services.common.kv_wire import chunk_key, end_key, layout_key, parse_stored, transfer_prefix
from opentelemetry import trace

from services.common.kvstore_client import KvStoreClient
from services.common.metrics import DecodeLoad, DecodeMetrics
from services.common.model_thread import ModelThread
from services.common.runtime import ModelRuntime
from services.common.sampling import Sampling, sample
from services.common.tasks import TaskSet
from services.common.telemetry import perf_to_unix_nanos

log = logging.getLogger(__name__)
tracer = trace.get_tracer("disagg.decode")

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    kv_timeout_seconds: float
    max_chunk_bytes: int
    max_active_requests: int


@dataclass(slots=True)
class Sequence:
    request_id: str
    prompt_len: int
    sampling: Sampling
    kv: asyncio.Future[AssembledKv] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    transfer_started: bool = False
    kv_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Token:
    token_id: int
    index: int


@dataclass(frozen=True, slots=True)
class Finished:
    reason: str
    completion_tokens: int


class DecodeEngine:
    def __init__(self, runtime: ModelRuntime, thread: ModelThread, limits: DecodeLimits,
                 store: KvStoreClient | None, metrics: DecodeMetrics) -> None:
        self._runtime = runtime
        self._thread = thread
        self._metrics = metrics
        self._limits = limits
        self._store = store
        self._cleanup = TaskSet()
        self.sequences: dict[str, Sequence] = {}
        self.requests_total = 0

    def admit(self, request_id: str, prompt_ids: list[int], sampling: Sampling) -> Sequence:
        if not request_id:
            raise InvalidRequest("request_id must not be empty")
        if request_id in self.sequences:
            raise InvalidRequest(f"request {request_id!r} is already active on this worker")
        if not prompt_ids:
            raise InvalidRequest("prompt_token_ids must not be empty")
        if len(prompt_ids) + sampling.max_tokens > self._runtime.geometry.max_model_len:
            raise InvalidRequest(f"prompt ({len(prompt_ids)}) + max_tokens ({sampling.max_tokens}) exceeds the "
                                 f"model's context of {self._runtime.geometry.max_model_len}")
        if len(self.sequences) >= self._limits.max_active_requests:
            raise CapacityExhausted(f"decode worker is full ({self._limits.max_active_requests} active requests)")
        sequence = Sequence(request_id, len(prompt_ids), sampling)
        self.sequences[request_id] = sequence
        self.requests_total += 1
        return sequence

    def begin_transfer(self, request_id: str) -> KvAssembler:
        """An assembler for the request's KV; only one transfer per request."""
        sequence = self.sequences.get(request_id)
        if sequence is None:
            raise UnknownRequest(f"no request {request_id!r} is waiting for KV on this worker")
        if sequence.transfer_started:
            raise KvProtocolError(f"request {request_id!r} already has a KV transfer")
        sequence.transfer_started = True
        return KvAssembler(request_id, self._runtime.geometry, sequence.prompt_len, self._limits.max_chunk_bytes)

    def complete(self, request_id: str, kv: AssembledKv) -> None:
        sequence = self.sequences.get(request_id)
        if sequence is not None and not sequence.kv.done():
            sequence.kv_bytes = kv.byte_count
            sequence.kv.set_result(kv)
            self._metrics.kv_bytes_received.inc(kv.byte_count)

    def fail(self, request_id: str, error: Exception) -> None:
        sequence = self.sequences.get(request_id)
        if sequence is not None and not sequence.kv.done():
            sequence.kv.set_exception(error)

    async def load_from_store(self, sequence: Sequence) -> None:
        """Take the request's KV from the kvstore instead of a direct stream."""
        if self._store is None:
            raise BackendUnavailable("this decode worker has no kvstore (--kvstore-address)")
        request_id = sequence.request_id
        assembler = self.begin_transfer(request_id)
        try:
            layout = _expect(parse_stored(await self._store.get(layout_key(request_id))), KvLayout)
            end = _expect(parse_stored(await self._store.get(end_key(request_id))), KvEnd)
            assembler.accept_layout(layout)
            for index in range(layout.chunk_count):
                assembler.accept_chunk(_expect(parse_stored(await self._store.get(chunk_key(request_id, index))),
                                               KvChunk))
            self.complete(request_id, assembler.finish(end))
        except Exception as error:
            self.fail(request_id, error)
            raise

    async def generate(self, sequence: Sequence) -> AsyncIterator[Token | Finished]:
        """Tokens after the first, then Finished. Raises the KV transfer's error if it failed."""
        try:
            kv = await asyncio.wait_for(asyncio.shield(sequence.kv), self._limits.kv_timeout_seconds)
        except TimeoutError:
            raise DeadlineExceeded(f"KV did not arrive within {self._limits.kv_timeout_seconds}s") from None
        cache = await self._thread.run(self._runtime.build_cache, kv.keys, kv.values)
        self._record_handoff(kv)
        token, produced = kv.first_token, 1
        per_token = self._runtime.geometry.kv_bytes_per_token
        with tracer.start_as_current_span("decode.generation") as span:
            started = time.perf_counter()
            while (reason := self._finish_reason(sequence.sampling, token, produced)) is None:
                step = await self._thread.run_timed(self._step, cache, token, sequence.sampling, produced)
                token = step.value
                self._metrics.time_per_output_token.observe(step.run_seconds + step.queued_seconds)
                sequence.kv_bytes += per_token
                yield Token(token, produced)
                produced += 1
            steps = produced - 1
            span.set_attributes({"decode.tokens": produced, "decode.finish_reason": reason,
                                 "decode.time_per_output_token_ms":
                                     (time.perf_counter() - started) * 1e3 / steps if steps else 0.0})
        yield Finished(reason, produced)

    def _record_handoff(self, kv: AssembledKv) -> None:
        now = perf_to_unix_nanos(time.perf_counter())
        start = min(kv.forward_end_unix_nanos or now, now)
        latency = (now - start) / 1e9
        tracer.start_span("kv.handoff", start_time=start, attributes={
            "kv.handoff_ms": latency * 1e3, "kv.bytes": kv.byte_count}).end(end_time=now)
        self._metrics.handoff_seconds.observe(latency)

    def _step(self, cache: object, token: int, sampling: Sampling, position: int) -> int:
        return sample(self._runtime.decode_step(cache, token), sampling, position)  # type: ignore[arg-type]

    def _finish_reason(self, sampling: Sampling, token: int, produced: int) -> str | None:
        if not sampling.ignore_eos and token in self._runtime.geometry.eos_token_ids:
            return FINISH_STOP
        if produced >= sampling.max_tokens:
            return FINISH_LENGTH
        return None

    def release(self, sequence: Sequence) -> None:
        """Drop everything the request holds, however it ended."""
        if self.sequences.get(sequence.request_id) is sequence:
            del self.sequences[sequence.request_id]
        if not sequence.kv.done():
            sequence.kv.cancel()
        elif not sequence.kv.cancelled():
            sequence.kv.exception()  # mark a failure as seen
        if self._store is not None:
            self._cleanup.spawn(self._delete_stored(sequence.request_id), f"delete-kv-{sequence.request_id}")

    async def _delete_stored(self, request_id: str) -> None:
        try:
            await self._store.delete_prefix(transfer_prefix(request_id))  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - stored KV also expires by TTL
            log.debug("could not delete stored KV of %s: %s", request_id, exc)

    def load(self) -> DecodeLoad:
        sequences = list(self.sequences.values())
        awaiting = sum(not s.kv.done() for s in sequences)
        return DecodeLoad(len(sequences), awaiting, len(sequences) - awaiting, sum(s.kv_bytes for s in sequences),
                          len(sequences) / self._limits.max_active_requests)

    async def close(self) -> None:
        await self._cleanup.cancel_all()


def _expect(message: object, kind: type) -> object:
    if not isinstance(message, kind):
        raise KvProtocolError(f"stored KV message is a {type(message).__name__}, expected {kind.__name__}")
    return message
