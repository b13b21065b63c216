"""The prefill engine.

Life of a request, as a sequence of queues:
  servicer -> model thread queue (one forward pass at a time, in arrival order)
  -> batcher (optional): queued prompts grouped up to a token budget, waiting briefly for company
  -> forward pass: each layer's KV is put on the request's layer queue the moment the layer is done
  -> chunk pump: opens every sink with the layout while the forward pass runs (a shared-memory
     segment is reserved meanwhile), then a finished layer group is cut into chunks, encoded off
     the event loop, and sent to every sink (the decode worker's TransferKv stream, the kvstore)
     while later layers compute
  -> the first token is sampled from the last logits (masked by the request's grammar, compiled off
     the event loop before the forward pass, for structured output) and emitted at once (TTFT), with its
     log-probability and the prompt's (computed from the forward pass's hidden states, a slice of
     positions at a time; such a prompt is not batched with others) when the request asks
  (a prompt longer than the prefill chunk runs as several forward jobs, each chunk's KV sent as
  soon as it is computed, so one huge prompt neither blows memory nor starves the queue)
  -> the end message (chunk count, first token, forward end time) closes each sink; the decode's
     acknowledgement ends the handoff; once the prompt's blocks are in the prefix cache (copied
     meanwhile), the summary is emitted, so a repeat sent the moment the request ends finds them.
Cancelling the request's task aborts its sinks; nothing is kept after it ends.

Spans (children of the `prefill.Prefill` server span): `prefill.queue_wait`, `prefill.forward`,
`prefill.kv_send` (kv.bytes, kv.chunks, kv.chunk_tokens, kv.chunk_layers, kv.encoding,
kv.throughput_bytes_per_second, kv.handoff_seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from services.common.errors import AlreadyExists, BackendUnavailable, InvalidRequest
from services.common.kv_codec import RAW_ENCODING, ChunkSource, KvEnd, KvLayout
from services.common.kv_wire import transfer_prefix
from services.common.kvstore_client import KvStoreClient
from services.common.grammar import GrammarState
from services.common.logit_controls import TokenContext, check_vocabulary
from services.common.logprobs import TokenLogprob
from services.common.scoring import token_logprob
from services.common.metrics import PrefillMetrics
from services.common.model_thread import ModelThread, Timed
from services.common.runtime import LayerKvCallback, ModelRuntime
from services.common.sampling import Sampling, sample
from services.common.tasks import TaskSet
from services.common.telemetry import perf_to_unix_nanos
from services.common.validation import check_id, check_token_ids
from services.prefill.batcher import PrefillBatcher
from services.prefill.prefix_cache import KvRecorder, PrefixHit, Recorded
from services.prefill.prefix_reuse import PrefixReuse
from services.prefill.records import PrefillSummary, record_forward, record_send
from services.prefill.sinks import BestEffortSink, KvSink, KvStoreSink

LayerKv = tuple[int, torch.Tensor, torch.Tensor]
OWN_CHUNK_BYTES = 16 << 20  # a transport's own chunks stay far under the decode's --max-chunk-mb (64)
KEEP_WAIT_SECONDS = 5.0  # the most a request's end waits for its prompt blocks to enter the prefix cache
Forwarded = tuple[torch.Tensor, list[TokenLogprob]]  # the last position's logits; the prompt's scores if asked


@dataclass(frozen=True, slots=True)
class PrefillJob:
    request_id: str  # the gateway's internal id
    prompt_ids: list[int]
    sampling: Sampling
    decode_sink: KvSink  # the TransferKv stream to the decode worker that admitted the request
    store_kv: bool  # the chunks go to the kvstore; the decode stream only announces them
    position_offset: int = 0  # completion position of the token sampled here
    transfer_attempt: int = 0  # retries of this request's transfer (on other prefill workers)
    known_first_token: int | None = None  # a retry's first token, already sent to the client
    known_choice_first_tokens: tuple[int, ...] = ()  # sampling.n > 1: choices 1.. the client already has
    cache_salt: str = ""  # names its prefix blocks (services.common.prefix_keys): tenants do not share
    decode_cached_tokens: int = 0  # leading prompt tokens the decode holds: the transfer need not carry them
    chunk_tokens: int = 0  # tokens per KV chunk its transport asks for (0: the worker's); see _layout

    @property
    def key(self) -> str:
        """What identifies this work on this worker (a second one is refused while it is live)."""
        return f"{self.request_id}/t{self.transfer_attempt}"


@dataclass(frozen=True, slots=True)
class FirstToken:
    token_id: int
    logprob: TokenLogprob | None = None  # when the request asks for logprobs
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # each prompt token's after the first, when asked
    ends_output: bool = False  # the token completed the request's grammar
    choice: int = 0  # which of the request's sampling.n choices it starts


@dataclass(frozen=True, slots=True)
class ChunkGeometry:
    """How KV is cut for the wire, and how long prompts are cut for the forward pass."""

    chunk_tokens: int
    chunk_layers: int
    prefill_chunk_tokens: int  # longer prompts run in forward chunks of this many tokens
    encoding: str = RAW_ENCODING  # of the chunks (fp8: lossy, a quarter of float32's bytes)


class PrefillEngine:
    def __init__(self, runtime: ModelRuntime, thread: ModelThread, geometry: ChunkGeometry,
                 store: KvStoreClient | None, checkpoint_kv: bool, metrics: PrefillMetrics,
                 batcher: PrefillBatcher | None = None, prefix: PrefixReuse | None = None) -> None:
        self._runtime = runtime
        self._thread = thread
        self._batcher = batcher
        self._chunking = geometry
        self._store = store
        self._checkpoint = checkpoint_kv
        self._metrics = metrics
        self._prefix = prefix
        self.prefix = None if prefix is None else prefix.cache  # (read by Stats)
        self._tasks = TaskSet()
        self.kv_bytes_held: dict[str, int] = {}
        self.requests_total = 0

    def _context(self, job: PrefillJob) -> TokenContext:
        """The prompt, whose last `position_offset` tokens are the completion so far (a failover)."""
        return TokenContext(job.prompt_ids, len(job.prompt_ids) - job.position_offset,
                            self._runtime.geometry.eos_token_ids)

    def validate(self, job: PrefillJob) -> None:
        geometry = self._runtime.geometry
        check_id("request_id", job.request_id)
        if not job.prompt_ids:
            raise InvalidRequest("prompt_token_ids must not be empty")
        check_token_ids("prompt_token_ids", job.prompt_ids, geometry.vocab_size)
        check_vocabulary(job.sampling.logit_bias, job.sampling.stop_token_ids, geometry.vocab_size)
        if job.known_first_token is not None:
            check_token_ids("known_first_token", [job.known_first_token], geometry.vocab_size)
        if len(job.known_choice_first_tokens) >= job.sampling.n or (job.known_choice_first_tokens
                                                                    and job.known_first_token is None):
            raise InvalidRequest(f"known_choice_first_tokens holds {len(job.known_choice_first_tokens)} tokens: at "
                                 f"most sampling.n - 1 ({job.sampling.n - 1}), and only with known_first_token")
        check_token_ids("known_choice_first_tokens", list(job.known_choice_first_tokens), geometry.vocab_size)
        if job.position_offset and job.sampling.n > 1:
            raise InvalidRequest("position_offset must be 0 with sampling.n > 1 (a failover resumes each choice "
                                 "on its own)")
        if not 0 <= job.position_offset < len(job.prompt_ids):
            raise InvalidRequest(f"position_offset {job.position_offset} must be below the prompt's length")
        if len(job.prompt_ids) >= geometry.max_model_len:
            raise InvalidRequest(f"prompt has {len(job.prompt_ids)} tokens; the model's context is "
                                 f"{geometry.max_model_len}")
        if job.decode_cached_tokens >= len(job.prompt_ids):
            raise InvalidRequest(f"decode_cached_tokens ({job.decode_cached_tokens}) must be below the prompt's "
                                 f"length ({len(job.prompt_ids)})")
        if job.key in self.kv_bytes_held:
            raise AlreadyExists(f"request {job.request_id!r} (transfer attempt {job.transfer_attempt}) is already "
                                "being prefilled on this worker")

    def _store_sink(self, job: PrefillJob) -> BestEffortSink | KvStoreSink | None:
        """The kvstore copy of the transfer: required with store_kv, best effort as a checkpoint."""
        if job.store_kv and self._store is None:
            raise BackendUnavailable("this prefill worker has no kvstore (--kvstore-address)")
        if self._store is None or not (job.store_kv or self._checkpoint):
            return None
        sink = KvStoreSink(self._store, transfer_prefix(job.request_id, job.transfer_attempt), self._tasks)
        return sink if job.store_kv else BestEffortSink(sink, "KV checkpoint to the kvstore")

    def _chunked(self, job: PrefillJob) -> bool:
        return len(job.prompt_ids) > self._chunking.prefill_chunk_tokens

    def _layout(self, job: PrefillJob, store_sink: KvSink | None) -> KvLayout:
        """A chunked prefill finishes all layers of a token range at a time, so its KV chunks span
        all layers (token-range order); otherwise layer groups stream as the forward pass goes. The
        chunks skip the prompt's tokens the decode holds (the kvstore copy is of the transfer too)."""
        geometry = self._runtime.geometry
        layers = geometry.num_layers if self._chunked(job) else min(self._chunking.chunk_layers, geometry.num_layers)
        return KvLayout(job.request_id, geometry.fingerprint, geometry.num_layers, geometry.num_kv_heads,
                        geometry.head_dim, len(job.prompt_ids), self._chunk_tokens(job, store_sink, layers), layers,
                        geometry.dtype, self._chunking.encoding, job.transfer_attempt, job.store_kv,
                        token_start=job.decode_cached_tokens)

    def _chunk_tokens(self, job: PrefillJob, store_sink: KvSink | None, layers: int) -> int:
        """--kv-chunk-tokens, or the job's own (its transport's: larger through shared memory) when
        only its decode sink receives raw chunks of a prompt prefilled whole (fp8's scales are per
        chunk: larger chunks would round coarser), at most OWN_CHUNK_BYTES a chunk unless that is
        less than --kv-chunk-tokens."""
        usual = self._chunking.chunk_tokens
        if not job.chunk_tokens or store_sink is not None or self._chunked(job) or \
                self._chunking.encoding != RAW_ENCODING:
            return usual
        token_bytes = self._runtime.geometry.kv_bytes_per_token // self._runtime.geometry.num_layers * layers
        return min(job.chunk_tokens, max(usual, OWN_CHUNK_BYTES // token_bytes))

    async def run(self, job: PrefillJob) -> AsyncIterator[FirstToken | PrefillSummary]:
        self.validate(job)
        store_sink = self._store_sink(job)
        layout = self._layout(job, store_sink)
        # The kvstore copy first: it is complete before the decode can finish and delete it.
        sinks: list[KvSink] = [sink for sink in (store_sink, job.decode_sink) if sink is not None]
        self.requests_total += 1
        self.kv_bytes_held[job.key] = 0
        pump: asyncio.Task[float] | None = None
        first_sent = 0.0
        try:
            grammar = await self._grammar(job)  # after the key is held: a duplicate is refused meanwhile
            hit = await self._lookup(job)
            wanted, rows = ([], None) if self._prefix is None else self._prefix.plan(hit)
            if self._chunked(job):
                await _send_all(sinks, layout)
                forward, first_sent, recorded = await self._forward_in_chunks(job, layout, sinks, hit, rows)
            else:
                loop = asyncio.get_running_loop()
                layers: asyncio.Queue[LayerKv] = asyncio.Queue()
                pump = asyncio.ensure_future(self._pump(job.key, layout, layers, sinks))
                recorder = KvRecorder(hit, lambda *kv: loop.call_soon_threadsafe(layers.put_nowait, kv), rows)
                forward = await self._forward(job, recorder if hit.blocks or rows else recorder.on_layer, hit)
                recorded = recorder.layers
            forward_done = time.perf_counter()
            record_forward(self._metrics, forward, hit.tokens, len(job.prompt_ids) - hit.tokens)
            firsts = [self._first_token(job, forward.value, grammar, choice) for choice in range(job.sampling.n)]
            if pump is not None and pump.done():
                pump.result()  # a transfer that could not open fails before the first token goes out
            for first in firsts:
                yield first
            cached: asyncio.Event | None = None
            if self._prefix is not None and wanted and len(recorded) == self._runtime.geometry.num_layers:
                cached = self._prefix.keep(hit, wanted, recorded, f"prefix-store-{job.key}")
            recorded = {}
            if pump is not None:
                first_sent = await pump
            end = KvEnd(job.request_id, layout.chunk_count, firsts[0].token_id, perf_to_unix_nanos(forward_done),
                        tuple(first.token_id for first in firsts[1:]))
            for sink in sinks:
                await sink.close(end)
            acknowledged = time.perf_counter()  # the handoff ends here, whatever the request waits for next
            if store_sink is not None:  # the decode acknowledged: its keys now
                store_sink.keep()
            if cached is not None:  # copied while the KV streamed; a repeat right after must find it
                with contextlib.suppress(TimeoutError):  # best effort: never holds a request for long
                    await asyncio.wait_for(cached.wait(), KEEP_WAIT_SECONDS)
            summary = PrefillSummary(self.kv_bytes_held[job.key], layout.chunk_count, forward.run_seconds,
                                     acknowledged - first_sent, acknowledged - forward_done,
                                     store_sink is not None and getattr(store_sink, "ok", True), hit.tokens)
            record_send(self._metrics, layout, summary, first_sent, acknowledged)
            yield summary
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
            for sink in sinks:
                sink.abort()
            self.kv_bytes_held.pop(job.key, None)

    async def close(self) -> None:
        await self._tasks.cancel_all()
        if self._prefix is not None:
            await self._prefix.close()

    async def _grammar(self, job: PrefillJob) -> GrammarState | None:
        """The request's grammar at the token sampled here (off the event loop: compiling takes ms)."""
        constraint = job.sampling.constraint
        all_known = job.known_first_token is not None and 1 + len(job.known_choice_first_tokens) == job.sampling.n
        if constraint is None or all_known:
            return None
        so_far = job.prompt_ids[len(job.prompt_ids) - job.position_offset :]
        return await asyncio.to_thread(self._runtime.grammars.start, constraint, so_far)

    def _first_token(self, job: PrefillJob, forward: Forwarded, grammar: GrammarState | None,
                     choice: int) -> FirstToken:
        """Choice `choice`'s first token, sampled from the last logits with the choice's seed (or a
        retry's known token), with what the request asks for (the prompt's scores go with choice 0)."""
        logits, scored = forward
        known = (job.known_first_token, *job.known_choice_first_tokens)
        grammar = None if grammar is None else grammar.fork()  # every choice walks the grammar on its own
        known_first = known[choice] if choice < len(known) else None
        if known_first is not None:
            first = known_first
        else:
            allowed = None if grammar is None else grammar.allowed()
            first = sample(logits, job.sampling.for_choice(choice), job.position_offset, self._context(job), allowed)
        top_n = job.sampling.logprobs
        ends_output = False
        if grammar is not None:
            grammar.consume(first)
            ends_output = grammar.finished
        return FirstToken(first, None if top_n is None else token_logprob(logits, first, top_n),
                          tuple(scored) if choice == 0 else (), ends_output, choice)

    async def _lookup(self, job: PrefillJob) -> PrefixHit:
        """The prompt's cached leading blocks (none with the cache off, or for a scored prompt, whose
        every position's scores need the whole forward pass); a chunked prefill resumes at a
        forward-chunk boundary."""
        if self._prefix is None:
            return PrefixHit([], [], 1)
        unit = self._chunking.prefill_chunk_tokens if self._chunked(job) else 0
        return await self._prefix.lookup(job.prompt_ids, job.cache_salt, job.sampling.prompt_logprobs is None, unit)

    async def _forward(self, job: PrefillJob, on_layer: LayerKvCallback, hit: PrefixHit) -> Timed[Forwarded]:
        """The prompt in one forward pass (batched with others, unless its prompt is scored or starts
        with cached blocks: then only the rest is computed, on the cached KV)."""
        if hit.blocks:
            return await self._thread.run_timed(self._forward_after, job, hit, on_layer)
        if self._batcher is None or job.sampling.prompt_logprobs is not None:
            return await self._thread.run_timed(self._runtime.prefill_scored, job.prompt_ids, on_layer,
                                                job.prompt_ids[1:], job.sampling.prompt_logprobs)
        timed = await self._batcher.forward(job.prompt_ids, on_layer)
        return Timed((timed.value, []), timed.queued_seconds, timed.run_seconds, timed.started_unix)

    def _forward_after(self, job: PrefillJob, hit: PrefixHit, on_layer: LayerKvCallback) -> Forwarded:
        """On the model thread: the prompt after its cached prefix."""
        cache = self._runtime.new_cache()
        hit.seed(cache, self._runtime.geometry.num_layers)
        return self._runtime.prefill_scored(job.prompt_ids[hit.tokens :], on_layer, [], None, cache)[0], []

    def _forward_chunk(self, job: PrefillJob, start: int, on_layer: LayerKvCallback, cache: DynamicCache
                       ) -> Forwarded:
        """On the model thread: one forward chunk of a long prompt, scored when the request asks."""
        end = start + self._chunking.prefill_chunk_tokens
        return self._runtime.prefill_scored(job.prompt_ids[start:end], on_layer, job.prompt_ids[start + 1 : end + 1],
                                            job.sampling.prompt_logprobs, cache)

    async def _forward_in_chunks(self, job: PrefillJob, layout: KvLayout, sinks: list[KvSink], hit: PrefixHit,
                                 rows: tuple[int, int] | None) -> tuple[Timed[Forwarded], float, Recorded]:
        """Chunked prefill: each forward chunk is its own job on the model thread, so other
        requests' work runs in between and activations stay bounded; its KV chunks go out at once.
        A cached prefix (whole forward chunks) is sent from the cache and not computed. Returns the
        KV of the token range `rows` per layer too (copied), for the prefix cache."""
        cache, step = self._runtime.new_cache(), self._chunking.prefill_chunk_tokens
        queued = run = 0.0
        first_sent, started_unix = 0.0, 0.0
        scored: list[TokenLogprob] = []
        segments: list[tuple[torch.Tensor, torch.Tensor]] = []  # the recorded rows of each forward chunk
        if hit.blocks:
            await self._thread.run(hit.seed, cache, self._runtime.geometry.num_layers)
            keys, values = (torch.stack(parts) for parts in zip(*(hit.layer_kv(i) for i in range(layout.num_layers))))
            for index in layout.token_range_chunks(0, hit.tokens):
                sent, encoded = await _send_chunk(sinks, ChunkSource(layout, index, keys, values))
                first_sent = first_sent or encoded
                self.kv_bytes_held[job.key] += sent
        for start in range(hit.tokens, len(job.prompt_ids), step):
            kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            part = await self._thread.run_timed(self._forward_chunk, job, start,
                                                lambda index, k, v: kv.__setitem__(index, (k, v)), cache)
            scored.extend(part.value[1])
            queued, run = queued + part.queued_seconds, run + part.run_seconds
            started_unix = started_unix or part.started_unix
            keys, values = torch.stack([kv[i][0] for i in sorted(kv)]), torch.stack([kv[i][1] for i in sorted(kv)])
            end = min(start + step, len(job.prompt_ids))
            if rows is not None and start < rows[1] and rows[0] < end:  # copies: the rest can go
                part_rows = slice(max(rows[0], start) - start, min(rows[1], end) - start)
                segments.append((keys[:, :, part_rows].clone(), values[:, :, part_rows].clone()))
            for index in layout.token_range_chunks(start, end):
                sent, encoded = await _send_chunk(sinks, ChunkSource(layout, index, keys, values, start))
                first_sent = first_sent or encoded
                self.kv_bytes_held[job.key] += sent
        recorded = {layer: (torch.cat([k[layer] for k, _ in segments], dim=1),
                            torch.cat([v[layer] for _, v in segments], dim=1))
                    for layer in range(layout.num_layers)} if segments else {}
        return Timed((part.value[0], scored), queued, run, started_unix), first_sent, recorded

    async def _pump(self, key: str, layout: KvLayout, layers: asyncio.Queue[LayerKv], sinks: list[KvSink]) -> float:
        """Send the layout, then each layer group's chunks as soon as the group's layers are
        computed. Returns the time the first chunk went out. The layout goes while the forward pass
        runs: opening a transfer (a shared-memory segment's reservation, ~40 ms for 94 MB) costs the
        handoff nothing."""
        await _send_all(sinks, layout)
        first_sent = 0.0
        pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for group in range(layout.layer_groups):
            group_layers = range(group * layout.chunk_layers, min((group + 1) * layout.chunk_layers,
                                                                  layout.num_layers))
            while not all(index in pending for index in group_layers):
                index, keys, values = await layers.get()
                pending[index] = (keys, values)
            keys = torch.stack([pending[i][0] for i in group_layers])
            values = torch.stack([pending[i][1] for i in group_layers])
            for index in group_layers:
                del pending[index]
            for chunk_index in layout.group_chunks(group):
                sent, encoded = await _send_chunk(sinks, ChunkSource(layout, chunk_index, keys, values))
                first_sent = first_sent or encoded
                self.kv_bytes_held[key] += sent
        return first_sent


async def _send_all(sinks: list[KvSink], message: object) -> None:
    await asyncio.gather(*(sink.send(message) for sink in sinks))  # type: ignore[arg-type]


async def _send_chunk(sinks: list[KvSink], source: ChunkSource) -> tuple[int, float]:
    """Encode the chunk off the event loop, once for every sink (or straight into a lone sink's
    own buffer: a shared-memory segment) and send it to each. Returns its byte length and when it
    was encoded (the transfer's clock starts at the first chunk's)."""
    chunk = await sinks[0].place(source) if len(sinks) == 1 else None
    if chunk is None:
        chunk = await asyncio.to_thread(source.encode)
    encoded = time.perf_counter()
    await _send_all(sinks, chunk)
    return chunk.byte_length, encoded
