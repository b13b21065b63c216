"""The decode engine: admission, KV arrival into the paged pool, and one continuous-batching loop.

Life of a request, as a sequence of queues:
  admit (refuse what can never fit the pool, what is above the reject threshold, ids already live;
  else take the prompt's longest cached prefix from the prefix cache (shared blocks; Accepted says
  how many tokens) and reserve blocks for the rest under a lease, plus a spare block per extra
  choice when the prompt ends in a partial block; compile a structured-output grammar off the event
  loop)                                                                       -> AWAITING_KV
  -> its KV lands straight in those blocks, every write checking the lease (and skipping the cached
     prefix, which a transfer need not carry: KvLayout.token_start): a TransferKv stream
     (chunks inline, or announced there and loaded from the kvstore; a retried transfer with a
     higher attempt supersedes an unfinished one) or a local prefill (unified mode, a background
     transfer computing only what follows the cached prefix, local_prefill.py); every chunk is
     verified; its full prompt blocks join the prefix cache
  -> with sampling.n > 1, choices 1 .. n-1 fork from choice 0: they share its full prompt blocks
     and get a copy of the partial one, and each starts from its own first token  -> READY queue
  -> the loop: schedule (pure bookkeeping, see scheduler.py) -> execute (one model-thread job:
     copy out the KV of sequences being preempted, then one batched decode step, each row's token
     chosen by choosing.py: controls, grammar mask, sample, log-probability) -> postprocess (the
     grammar takes the token; append, stream, finish and free; start the swap transfers asked for)
  -> finished (EOS, a stop token id, a complete grammar, max_tokens), failed (bad KV, KV timeout,
     a failed step) or cancelled;
     however it ends, its blocks return to the pool (cached ones stay, evictable), its lease is
     revoked (late writes are dropped) and its stored KV is deleted.
A failing step fails only its own sequences. If the loop itself ever ends, `on_fatal` is called
(the worker turns NOT_SERVING and exits non-zero); a step running past --step-timeout-seconds is
treated the same way, since the model thread cannot be interrupted.

Spans: `kv.handoff` (kv_accounting.py) and `decode.preempt` events in the log.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from services.common.errors import DeadlineExceeded, InternalFailure, KvProtocolError, RequestCancelled
from services.common.kv_codec import RAW_ENCODING, KvLayout
from services.common.kv_wire import KvMessage
from services.common.kv_assembly import AssemblyLimits, KvAssembler, KvReceipt
from services.common.kv_ingest import NativeIngest
from services.common.kvstore_client import KvStoreClient
from services.common.metrics import DecodeLoad, DecodeMetrics
from services.common.model_thread import ModelThread
from services.common.packed_weights import PackedWeights
from services.decode.native_attention import NativeAttention
from services.decode.one_stream import OneStream
from services.common.runtime import ModelRuntime
from services.common.tasks import TaskSet
from services.decode.admission import Admission, AdmissionLimits
from services.decode.blocks import BlockManager, Lease, LeasedWriter
from services.decode.cached_blocks import CachedBlocks
from services.decode.choosing import TokenChooser
from services.decode.kv_accounting import KvAccounting
from services.decode.local_prefill import LocalPrefill
from services.decode.paged_runner import PagedRunner, StepSlot
from services.decode.pool import BlockPool, PoolConfig
from services.decode.scheduler import Scheduler, SchedulerLimits, StepPlan
from services.decode.sequence import Event, Finished, Sequence, State, Token
from services.decode.swap import KvSwapper
from services.decode.transfers import Transfer

log = logging.getLogger(__name__)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FORGET_WAIT_SECONDS = 30.0  # how long cleanup waits for a cancelled transfer to stop writing


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    kv_timeout_seconds: float
    assembly: AssemblyLimits
    admission: AdmissionLimits
    max_batch_size: int
    preempt_threshold: float  # pool pressure above which running sequences are preempted
    step_timeout_seconds: float = 300.0
    batch_invariant: bool = False  # every sequence's logits bit-identical to a batch of one (slower)
    prefix_cache: bool = True  # keep prompt blocks for reuse by later requests (cached_blocks.py)


@dataclass(frozen=True, slots=True)
class FastPaths:
    """Faster ways to do what the engine does anyway, each None where it cannot be used here:
    packed weight products, the C attention kernel of batched steps, the one-pass KV ingest, the
    one-stream path of a batch of one."""

    packed: PackedWeights | None = None
    attention: NativeAttention | None = None
    ingest: NativeIngest | None = None
    one_stream: OneStream | None = None


@dataclass(frozen=True, slots=True)
class _Executed:
    """What one model-thread job returns: each run sequence's token (or why it has none) and the
    copied-out KV of each sequence being preempted."""

    tokens: list[Token | Exception]  # index: the completion index of the token
    swapped_out: list[list[KvMessage]]


def _swapping_out(sequence: Sequence) -> bool:
    """Whether the sequence still wants its KV swapped out (a swap-out's `wanted`)."""
    return sequence.state is State.SWAPPING_OUT


class DecodeEngine:
    def __init__(self, runtime: ModelRuntime, thread: ModelThread, pool: PoolConfig, limits: DecodeLimits,
                 store: KvStoreClient | None, metrics: DecodeMetrics, on_fatal: Callable[[str], None],
                 fast: FastPaths = FastPaths()) -> None:
        self._runtime = runtime
        self._thread = thread
        self._limits = limits
        self._metrics = metrics
        self._on_fatal = on_fatal
        self._pool = BlockPool(pool, runtime.geometry, runtime.device, fast.ingest)
        cache = CachedBlocks(metrics.prefix_evictions.inc) if limits.prefix_cache else None
        self.blocks = BlockManager(pool, cache)
        self._runner = PagedRunner(runtime, self._pool, limits.batch_invariant, fast.packed, fast.attention,
                                   fast.one_stream)
        self.swapper = KvSwapper(runtime, thread, self._pool, store, limits.assembly)
        self._scheduler = Scheduler(self.blocks, SchedulerLimits(limits.max_batch_size, limits.preempt_threshold,
                                                                 runtime.geometry.kv_bytes_per_token))
        self.accounting = KvAccounting(self.blocks, runtime.geometry.fingerprint, runtime.geometry.kv_bytes_per_token,
                                       metrics)
        self._admission = Admission(runtime.geometry, self.blocks, limits.admission)
        self._chooser = TokenChooser(runtime)
        self._local = LocalPrefill(runtime, thread, self._pool, self.blocks, self._chooser)
        self.sequences: dict[str, Sequence] = {}
        self._deadlines: dict[str, asyncio.TimerHandle] = {}
        self._wake = asyncio.Event()
        self._tasks = TaskSet()
        self.requests_total = 0
        self.preemptions_total = 0

    def start(self) -> None:
        loop = self._tasks.spawn(self._loop(), "decode-loop")
        loop.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            self._on_fatal(f"the decode loop ended: {task.exception()!r}")

    # admission and KV arrival -------------------------------------------------------------
    def budget_bytes(self, requested_mb: float) -> int:
        return self._admission.budget_bytes(requested_mb)

    async def compile_grammar(self, sequence: Sequence) -> None:
        """A structured-output request's grammar (see TokenChooser.grammar), for each of its choices."""
        grammar = await self._chooser.grammar(sequence)
        for choice in sequence.choices:
            choice.grammar = grammar if choice is sequence or grammar is None else grammar.fork()

    def admit(self, request: Sequence) -> Sequence:
        """Admit a request (validated here, before anything is reserved) and reserve its prompt's
        blocks, with a spare block for each other choice's copy of a partial last block."""
        request.siblings = [request.sibling(choice) for choice in range(1, request.sampling.n)]
        self._admission.check(request, self.sequences)
        cached = self.accounting.cached_prefix(request)
        for choice in request.siblings:  # the same prompt: a preempted choice finds its prefix again
            choice.block_keys = request.block_keys
        self._admission.check_room(request, cached)
        spare = len(request.siblings) * (len(request.prompt_ids) % self.blocks.block_size > 0)
        request.lease = self.blocks.allocate(request.request_id, len(request.prompt_ids), spare, cached)
        request.cached_tokens = len(cached) * self.blocks.block_size
        request.cache_generation = self.blocks.cache_generation
        self.accounting.admitted(request)
        for choice in request.choices:
            self.sequences[choice.request_id] = choice
        self.requests_total += 1
        self._deadlines[request.request_id] = asyncio.get_running_loop().call_later(
            self._limits.kv_timeout_seconds, self._kv_deadline, request)
        return request

    def _kv_deadline(self, sequence: Sequence) -> None:
        if sequence.state is State.AWAITING_KV:
            self._fail(sequence, DeadlineExceeded(f"KV did not arrive within {self._limits.kv_timeout_seconds}s"))

    def begin_transfer(self, layout: KvLayout) -> tuple[Sequence, KvAssembler]:
        """An assembler writing a pushed transfer into the request's blocks under a fresh lease."""
        sequence = self._admission.transfer_target(layout, self.sequences)
        sequence.lease = self.blocks.renew(sequence.request_id)  # an older, unfinished transfer loses its lease
        sequence.transfer_attempt = layout.transfer_attempt
        writer = LeasedWriter(self._pool, self.blocks, sequence.lease, sequence.cached_tokens)
        return sequence, KvAssembler(sequence.request_id, self._runtime.geometry, len(sequence.prompt_ids),
                                     self._limits.assembly, writer, sequence.cached_tokens)

    def complete(self, sequence: Sequence, lease: Lease, receipt: KvReceipt) -> None:
        """A pushed transfer is complete and verified; refused if the request no longer wants it."""
        if sequence.state is not State.AWAITING_KV or not self.blocks.holds(lease):
            raise RequestCancelled(f"request {sequence.request_id!r} was cancelled or its KV superseded")
        firsts = (receipt.first_token, *receipt.choice_first_tokens)
        if len(firsts) != len(sequence.choices):
            raise KvProtocolError(f"KV end carries first tokens for {len(firsts)} choices; the request has "
                                  f"{len(sequence.choices)}")
        self.accounting.received(sequence, receipt)
        if receipt.encoding != RAW_ENCODING:  # lossy KV (its chunk's scales) joins no cache: others would get it
            sequence.block_keys = []
        self._kv_arrived(sequence, [Token(first, sequence.position_offset, choice=choice)
                                    for choice, first in enumerate(firsts)])

    def transfer_failed(self, sequence: Sequence, lease: Lease, error: Exception) -> Exception:
        """A pushed transfer was bad: the request fails with its status, and the sender gets it
        too; unless the request is gone or a newer transfer took over: then nothing fails and the
        sender gets CANCELLED."""
        if not self.blocks.holds(lease):
            return RequestCancelled(f"request {sequence.request_id!r} was cancelled or its KV superseded while "
                                    f"this transfer ({error}) was in progress")
        if sequence.state is State.AWAITING_KV:
            self._fail(sequence, error)
        return error

    def prefill_locally(self, sequence: Sequence) -> None:
        """Unified mode: compute the prompt's KV here, as a background fill the scheduler polls;
        the first token is streamed too."""
        writer = LeasedWriter(self._pool, self.blocks, sequence.lease, sequence.cached_tokens)  # type: ignore[arg-type]
        transfer = Transfer.start(self._tasks, self._local.first_tokens(sequence, writer),
                                  f"prefill-{sequence.request_id}", self._wake.set)
        self._scheduler.watch(sequence, transfer)

    def _kv_arrived(self, sequence: Sequence, firsts: list[Token]) -> None:
        """The KV is complete: the other choices fork from it, and each choice's first token goes
        out on the stream too (the gateway has it from the prefill already, unless that prefill
        died before passing it on) and the choice joins. Its full prompt blocks join the prefix cache."""
        self.blocks.remember(sequence.request_id, sequence.block_keys, sequence.cache_generation)
        for choice in sequence.siblings:  # all forked before any choice may fail and free the prompt's blocks
            choice.lease, copy = self.blocks.fork(sequence.request_id, choice.request_id, len(sequence.prompt_ids))
            if copy is not None:
                self._pool.copy_block(*copy)
        for choice, first in zip(sequence.choices, firsts):
            if (accepted := self._accept(choice, first)) is None:
                continue
            choice.events.put_nowait(accepted)
            choice.generated.append(accepted.token_id)
            if self._finish(choice) is None:
                self._scheduler.ready(choice)
        self._wake.set()

    def _accept(self, sequence: Sequence, token: Token) -> Token | None:
        """The token as it goes out; None (the sequence failed) if its grammar cannot take it."""
        try:
            return self._chooser.accept(sequence, token)
        except InternalFailure as error:
            self._fail(sequence, error)
            return None

    def _fail(self, sequence: Sequence, error: BaseException) -> None:
        self._scheduler.finish(sequence)
        sequence.events.put_nowait(error if isinstance(error, Exception) else RequestCancelled(str(error)))
        self._wake.set()

    async def events(self, sequence: Sequence) -> AsyncIterator[Token | Finished]:
        """What the request's Generate stream sends, until every choice has Finished. Raises the
        request's error (any choice's)."""
        unfinished = len(sequence.choices)
        while unfinished:
            event: Event = await sequence.events.get()
            if isinstance(event, Exception):
                raise event
            yield event
            unfinished -= isinstance(event, Finished)

    # the loop -----------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                plan = self._scheduler.schedule()
                self._apply(plan)
                if not plan.needs_model:
                    break
                await self._execute(plan)

    def _apply(self, plan: StepPlan) -> None:
        """What the plan says before the step: arrivals join, failures are told, swap-ins start."""
        for sequence, first in plan.arrived:
            self._kv_arrived(sequence, first)
        for sequence, error in plan.failed:
            self._fail(sequence, error)
        for sequence in plan.swap_in:
            writer = LeasedWriter(self._pool, self.blocks, sequence.lease, sequence.cached_tokens)  # type: ignore
            swap_in = self.swapper.swap_in(sequence, writer, self.blocks.table(sequence.request_id))
            self._scheduler.watch(sequence, Transfer.start(self._tasks, swap_in,
                                                           f"swap-in-{sequence.request_id}", self._wake.set))
        self.preemptions_total += len(plan.swap_out)

    async def _execute(self, plan: StepPlan) -> None:
        job = asyncio.ensure_future(self._thread.run_timed(self._run_job, plan))
        try:
            done = await asyncio.wait_for(asyncio.shield(job), self._limits.step_timeout_seconds)
        except TimeoutError:
            self._on_fatal(f"a decode step ran past {self._limits.step_timeout_seconds}s")
            raise
        except Exception as error:  # noqa: BLE001 - a failing step fails its own sequences only
            log.exception("decode step failed")
            self._scheduler.step_ended()
            for sequence in plan.run:
                self._fail(sequence, InternalFailure(f"decode step failed: {type(error).__name__}: {error}"))
            for sequence in plan.swap_out:  # their KV was not copied out: they will be recomputed
                self._scheduler.copy_failed(sequence)
            return
        if plan.run:  # a job that only copied preempted KV out is no decode step
            self._metrics.time_per_output_token.observe(done.run_seconds)
        self._scheduler.step_ended()
        self._postprocess(plan, done.value)

    def _run_job(self, plan: StepPlan) -> _Executed:
        """On the model thread: copy out what is being preempted (before the step may reuse its
        blocks), then one decode step for every running sequence, sampled per sequence."""
        swapped = [self.swapper.copy_out(s, self.blocks.table(s.request_id)) for s in plan.swap_out]
        if not plan.run:
            return _Executed([], swapped)
        slots = [StepSlot(self.blocks.table(s.request_id), s.kv_tokens, s.generated[-1]) for s in plan.run]
        logits = self._runner.step(slots)
        return _Executed([self._chooser.choose(logits[row], s) for row, s in enumerate(plan.run)], swapped)

    def _postprocess(self, plan: StepPlan, executed: _Executed) -> None:
        for sequence, token in zip(plan.run, executed.tokens):
            if sequence.state is not State.RUNNING:  # released while the step ran
                continue
            if isinstance(token, Exception):
                self._fail(sequence, token if isinstance(token, InternalFailure) else InternalFailure(str(token)))
                continue
            if (accepted := self._accept(sequence, token)) is None:
                continue
            token = accepted
            sequence.generated.append(token.token_id)
            sequence.events.put_nowait(token)
            self._finish(sequence)
        for sequence, messages in zip(plan.swap_out, executed.swapped_out):
            self._scheduler.copied_out(sequence)
            if sequence.state is State.SWAPPING_OUT:
                store = self.swapper.swap_out(sequence, messages, functools.partial(_swapping_out, sequence))
                self._scheduler.watch(sequence, Transfer.start(self._tasks, store, f"swap-out-{sequence.request_id}",
                                                               self._wake.set))

    def _finish(self, sequence: Sequence) -> str | None:
        token, produced = sequence.generated[-1], sequence.completion_index
        reason = None
        if not sequence.sampling.ignore_eos and token in self._runtime.geometry.eos_token_ids:
            reason = FINISH_STOP
        elif token in sequence.sampling.stop_token_ids:
            reason = FINISH_STOP
        elif sequence.grammar is not None and sequence.grammar.finished:  # nothing more may follow
            reason = FINISH_STOP
        elif produced >= sequence.sampling.max_tokens:
            reason = FINISH_LENGTH
        if reason is not None:
            sequence.events.put_nowait(Finished(reason, produced, sequence.choice))
            self._scheduler.finish(sequence)
        return reason

    # end of a request ---------------------------------------------------------------------
    def release(self, sequence: Sequence) -> None:
        """Drop everything the request (every choice of it) holds, however it ended."""
        if (deadline := self._deadlines.pop(sequence.request_id, None)) is not None:
            deadline.cancel()
        transfers = [choice.transfer for choice in sequence.choices if choice.transfer is not None]
        for choice in sequence.choices:
            if self.sequences.get(choice.request_id) is choice:
                del self.sequences[choice.request_id]
            self._scheduler.finish(choice)
        self._wake.set()  # freed blocks may let a preempted sequence resume
        if self.swapper.has_store:  # every choice's keys lie under the request's
            self._tasks.spawn(self._forget(sequence.request_id, transfers), f"forget-{sequence.request_id}")

    async def _forget(self, request_id: str, transfers: list[Transfer[object]]) -> None:
        for transfer in transfers:  # a cancelled swap-out must stop writing before its keys go
            await transfer.settled(FORGET_WAIT_SECONDS)
        await self.swapper.forget(request_id)

    def load(self) -> DecodeLoad:
        sequences = [s for s in self.sequences.values() if s.state is not State.FINISHED]  # a request's ended choices
        awaiting = sum(s.state is State.AWAITING_KV for s in sequences)
        block_bytes = self._runtime.geometry.kv_bytes_per_token * self.blocks.block_size
        cache = self.blocks.cache
        return DecodeLoad(len(sequences), awaiting, self._scheduler.running, self.blocks.used * block_bytes,
                          self.blocks.pressure, cache.cached if cache else 0, cache.evictable if cache else 0)

    async def close(self) -> None:
        await self._tasks.cancel_all()
