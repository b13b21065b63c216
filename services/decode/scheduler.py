"""The decode scheduler: pure bookkeeping over the block manager and the queues. No awaits, no I/O:
`schedule()` polls the background transfers, then decides what runs, what is preempted, what
resumes and what failed, and returns it as a StepPlan for the engine to carry out.

Queues of a sequence after admission:
  AWAITING_KV --KV pushed or fill transfer done--> READY --batch has room--> RUNNING
  RUNNING --pool short / over pressure / over budget--> SWAPPING_OUT (KV copied out in the next
      model-thread job, blocks freed after it, then stored) --> PREEMPTED (oldest first)
  PREEMPTED --fits below the preempt threshold--> SWAPPING_IN (new blocks, new lease) --> READY
  any --finished, failed or released--> FINISHED (blocks freed; after the step if in one)
A sequence is never preempted in favour of nobody: a lone running sequence that cannot grow sits
the step out until what holds the rest of the pool (KV in flight, a swap-in) moves on; admission
refuses requests that could never fit the pool alone.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from services.decode.blocks import BlockManager
from services.decode.sequence import Sequence, State, Token
from services.decode.transfers import Poll, Transfer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    max_batch_size: int
    preempt_threshold: float  # pool pressure above which the newest sequences are preempted
    kv_bytes_per_token: int


@dataclass(slots=True)
class StepPlan:
    """What the engine does next."""

    run: list[Sequence] = field(default_factory=list)  # one decode step each (blocks already grown)
    swap_out: list[Sequence] = field(default_factory=list)  # copy KV out in the step's job, then store it
    swap_in: list[Sequence] = field(default_factory=list)  # blocks reserved under a new lease: bring KV back
    arrived: list[tuple[Sequence, list[Token]]] = field(default_factory=list)  # fill done: each choice's first
    failed: list[tuple[Sequence, BaseException]] = field(default_factory=list)  # blocks already freed

    @property
    def needs_model(self) -> bool:
        return bool(self.run or self.swap_out)


class Scheduler:
    def __init__(self, blocks: BlockManager, limits: SchedulerLimits) -> None:
        self._blocks = blocks
        self._limits = limits
        self._ready: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._preempted: deque[Sequence] = deque()
        self._moving: list[Sequence] = []  # a transfer in flight
        self._in_step: list[Sequence] = []  # their blocks are in use by the model thread

    @property
    def running(self) -> int:
        return len(self._running)

    # events ---------------------------------------------------------------------------------
    def watch(self, sequence: Sequence, transfer: Transfer[Any]) -> None:
        """The sequence now moves KV in the background; its outcome comes from polling."""
        sequence.transfer = transfer
        self._moving.append(sequence)

    def ready(self, sequence: Sequence) -> None:
        sequence.state = State.READY
        self._ready.append(sequence)

    def copied_out(self, sequence: Sequence) -> None:
        """The step's job copied a preempted sequence's KV out of the pool: its blocks can go."""
        if sequence.state is State.SWAPPING_OUT:
            self._blocks.free(sequence.request_id)

    def copy_failed(self, sequence: Sequence) -> None:
        """The job that was to copy a preempted sequence's KV out failed: drop the KV (its blocks
        go back) and recompute it on resume."""
        if sequence.state is State.SWAPPING_OUT:
            self._blocks.free(sequence.request_id)
            self._preempt_done(sequence, swapped=False)

    def step_ended(self) -> None:
        """Blocks of sequences released while the step ran go back now."""
        for sequence in self._in_step:
            if sequence.state is State.FINISHED:
                self._blocks.free(sequence.request_id)
        self._in_step = []

    def finish(self, sequence: Sequence) -> None:
        """The sequence is done (finished, failed or released): out of every queue, blocks freed
        (after the step it is in), its transfer cancelled."""
        sequence.state = State.FINISHED
        for queue in (self._ready, self._running, self._preempted, self._moving):
            if sequence in queue:
                queue.remove(sequence)
        if sequence.transfer is not None:
            sequence.transfer.cancel()
        if sequence not in self._in_step:
            self._blocks.free(sequence.request_id)

    # the decision ---------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._poll_transfers(plan)
        self._resume(plan)
        self._join_ready()
        runnable = self._grow(plan)
        self._relieve_pressure(plan)
        self._enforce_budgets(plan)
        plan.run = [sequence for sequence in runnable if sequence.state is State.RUNNING]
        self._in_step = plan.run + plan.swap_out
        return plan

    def _poll_transfers(self, plan: StepPlan) -> None:
        for sequence in list(self._moving):
            transfer = sequence.transfer  # set by watch() for everything in _moving
            status = transfer.poll()  # type: ignore[union-attr]
            if status is Poll.PENDING:
                continue
            self._moving.remove(sequence)
            sequence.transfer = None
            if status is Poll.FAILED and sequence.state is State.SWAPPING_OUT:
                log.warning("swap-out of %s failed (%s); it will be recomputed", sequence.request_id,
                            transfer.error())  # type: ignore[union-attr]
                self._preempt_done(sequence, swapped=False)
            elif status is Poll.FAILED:
                self._fail(sequence, transfer.error(), plan)  # type: ignore[union-attr]
            elif sequence.state is State.AWAITING_KV:
                plan.arrived.append((sequence, transfer.result()))  # type: ignore[union-attr,arg-type]
            elif sequence.state is State.SWAPPING_OUT:
                self._preempt_done(sequence, swapped=bool(transfer.result()))  # type: ignore[union-attr]
            elif sequence.state is State.SWAPPING_IN:
                self.ready(sequence)

    def _preempt_done(self, sequence: Sequence, swapped: bool) -> None:
        sequence.state, sequence.swapped = State.PREEMPTED, swapped
        self._preempted.append(sequence)

    def _fail(self, sequence: Sequence, error: BaseException, plan: StepPlan) -> None:
        self.finish(sequence)
        plan.failed.append((sequence, error))

    def _resume(self, plan: StepPlan) -> None:
        """Oldest first, while they fit: each takes its prompt's cached blocks again (so its own
        prefix is not evicted to make room for a copy of itself) and new blocks for the rest."""
        while waiting := self._next_to_resume():
            cached = self._blocks.lookup(waiting.block_keys[: len(waiting.prompt_ids) // self._blocks.block_size])
            if not self._fits_below_threshold(waiting.kv_tokens + 1, cached):
                break
            self._preempted.remove(waiting)
            waiting.lease = self._blocks.allocate(waiting.request_id, waiting.kv_tokens + 1, cached=cached)
            waiting.cached_tokens = len(cached) * self._blocks.block_size  # its swap-in writes after them
            waiting.state = State.SWAPPING_IN
            plan.swap_in.append(waiting)

    def _next_to_resume(self) -> Sequence | None:
        """Oldest preempted sequence; one over its KV budget only when nothing else waits or runs."""
        for sequence in self._preempted:
            if not sequence.over_budget(self._limits.kv_bytes_per_token):
                return sequence
        if self._preempted and not self._running and not self._ready:
            return self._preempted[0]
        return None

    def _fits_below_threshold(self, tokens: int, cached: list[int]) -> bool:
        """Whether `tokens` tokens of KV, the `cached` leading blocks shared, fit and keep the pool
        at or under the preempt threshold (no thrashing), or fit at all when nothing runs."""
        available = self._blocks.available(cached)
        needed = self._blocks.blocks_for(tokens) - len(cached)
        if needed > available:
            return False
        revived = self._blocks.free_blocks - available  # cached blocks no one used, in use again
        after = (self._blocks.used + needed + revived) / self._blocks.total
        return after <= self._limits.preempt_threshold or not (self._running or self._ready)

    def _join_ready(self) -> None:
        while self._ready and len(self._running) < self._limits.max_batch_size:
            sequence = self._ready.popleft()
            sequence.state = State.RUNNING
            self._running.append(sequence)

    def _grow(self, plan: StepPlan) -> list[Sequence]:
        """Give each running sequence (oldest first) room for its next token. One that cannot get it
        makes newer sequences leave (their blocks come back after this step), or ready ones that
        cannot run anyway (the batch is full), and sits this step out; the newest preempts itself;
        a lone one just waits (it always fits the pool alone)."""
        runnable = []
        for sequence in sorted(self._running, key=lambda s: s.admitted_at):
            if sequence.state is not State.RUNNING:
                continue
            if self._blocks.ensure(sequence.request_id, sequence.kv_tokens + 1):
                runnable.append(sequence)
                continue
            short = self._blocks.blocks_for(sequence.kv_tokens + 1) - self._blocks.blocks_of(
                sequence.request_id) - self._blocks.free_blocks
            leaving = self._leaving(plan)
            while short > leaving and (victim := self._newer_victim(sequence)) is not None:
                self._preempt(victim, plan)
                leaving = self._leaving(plan)
            if short > leaving and len(self._running) > 1:
                self._preempt(sequence, plan)
        return runnable

    def _newer_victim(self, sequence: Sequence) -> Sequence | None:
        """The newest sequence newer than `sequence`, or else the newest ready one whatever its age:
        a ready sequence the full batch keeps out holds blocks it cannot use."""
        newer = [s for s in (*self._running, *self._ready) if s.admitted_at > sequence.admitted_at]
        return max(newer or self._ready, key=lambda s: s.admitted_at, default=None)

    def _leaving(self, plan: StepPlan) -> int:
        """Blocks that come back once this step's job has copied the preempted sequences out (a
        prompt block shared by choices only when every one of them leaves)."""
        return self._blocks.freeable(s.request_id for s in plan.swap_out)

    def _relieve_pressure(self, plan: StepPlan) -> None:
        while ((self._blocks.used - self._leaving(plan)) / self._blocks.total > self._limits.preempt_threshold
               and len(self._running) > 1):
            self._preempt(max(self._running, key=lambda s: s.admitted_at), plan)

    def _enforce_budgets(self, plan: StepPlan) -> None:
        for sequence in [s for s in self._running if s.over_budget(self._limits.kv_bytes_per_token)]:
            others = any(s.request != sequence.request for s in (*self._running, *self._ready))
            if others:  # over budget yields to other requests, never to nobody (nor to its own choices)
                self._preempt(sequence, plan)

    def _preempt(self, sequence: Sequence, plan: StepPlan) -> None:
        for queue in (self._running, self._ready):
            if sequence in queue:
                queue.remove(sequence)
        sequence.state = State.SWAPPING_OUT
        sequence.swaps += 1
        plan.swap_out.append(sequence)
        log.info("preempting %s (%d tokens of KV); pool pressure %.2f", sequence.request_id, sequence.kv_tokens,
                 self._blocks.pressure)

