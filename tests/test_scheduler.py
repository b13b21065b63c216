"""The decode scheduler and block leases as pure bookkeeping: no model, no network, no awaits in
what is tested (transfers are real asyncio tasks the test finishes by hand)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.common.runtime import ModelGeometry
from services.common.sampling import Sampling
from services.decode.blocks import BlockManager, LeasedWriter, LeaseRevoked
from services.decode.pool import BlockPool, PoolConfig
from services.decode.scheduler import Scheduler, SchedulerLimits
from services.decode.sequence import Sequence, State
from services.decode.transfers import Poll, Transfer
from services.common.tasks import TaskSet

BLOCK = 16
GEOMETRY = ModelGeometry("test", "f" * 16, "float32", num_layers=2, num_kv_heads=1, head_dim=4, max_model_len=4096,
                         eos_token_ids=frozenset({0}), vocab_size=100)


def make(blocks: int, threshold: float = 0.85, batch: int = 8) -> tuple[BlockManager, Scheduler]:
    manager = BlockManager(PoolConfig(blocks, BLOCK))
    return manager, Scheduler(manager, SchedulerLimits(batch, threshold, GEOMETRY.kv_bytes_per_token))


def admitted(manager: BlockManager, name: str, prompt: int, max_tokens: int = 100, at: float = 0.0) -> Sequence:
    sequence = Sequence(name, [1] * prompt, Sampling(temperature=0, max_tokens=max_tokens), admitted_at=at)
    sequence.lease = manager.allocate(name, prompt)
    return sequence


def running(manager: BlockManager, scheduler: Scheduler, name: str, prompt: int, at: float) -> Sequence:
    sequence = admitted(manager, name, prompt, at=at)
    sequence.generated.append(5)
    scheduler.ready(sequence)
    return sequence


def step(scheduler: Scheduler, plan_run: list[Sequence]) -> None:
    """What the engine does after a step: tokens appended, deferred frees done."""
    scheduler.step_ended()
    for sequence in plan_run:
        if sequence.state is State.RUNNING:
            sequence.generated.append(5)


def test_lone_sequence_that_cannot_grow_sits_out_and_is_never_preempted() -> None:
    manager, scheduler = make(blocks=4)
    lone = running(manager, scheduler, "lone", prompt=47, at=1)  # 3 blocks; its 49th token needs a 4th
    waiting = admitted(manager, "waiting", prompt=10, at=2)  # holds the 4th block while its KV arrives
    plan = scheduler.schedule()
    assert plan.run == [lone]
    step(scheduler, plan.run)  # 48 tokens of KV now: the next token needs block 4
    plan = scheduler.schedule()
    assert (plan.run, plan.swap_out) == ([], []) and lone.state is State.RUNNING
    scheduler.finish(waiting)  # the other request goes away: its block comes back
    plan = scheduler.schedule()
    assert plan.run == [lone] and manager.blocks_of("lone") == 4


def test_newest_sequence_makes_room_and_its_blocks_return_only_after_the_step() -> None:
    manager, scheduler = make(blocks=4, threshold=1.0)
    old = running(manager, scheduler, "old", prompt=32, at=1)  # 2 blocks, full
    new = running(manager, scheduler, "new", prompt=31, at=2)  # 2 blocks, one slot left
    plan = scheduler.schedule()
    assert plan.swap_out == [new] and new.state is State.SWAPPING_OUT  # old needs a third block
    assert old not in plan.run  # it sits out until the blocks come back
    assert manager.blocks_of("new") == 2  # still there: the step's job copies them out first
    scheduler.copied_out(new)
    step(scheduler, plan.run)
    assert manager.blocks_of("new") == 0
    assert scheduler.schedule().run == [old]


def test_release_during_swap_in_never_makes_the_sequence_ready() -> None:
    async def scenario() -> None:
        manager, scheduler = make(blocks=8, threshold=1.0)
        sequence = admitted(manager, "s", prompt=20)
        sequence.generated.append(5)
        manager.free("s")
        sequence.state = State.PREEMPTED
        scheduler._preempt_done(sequence, swapped=True)  # as a finished swap-out leaves it
        plan = scheduler.schedule()
        assert plan.swap_in == [sequence] and sequence.state is State.SWAPPING_IN
        gate = asyncio.Event()
        tasks = TaskSet()
        scheduler.watch(sequence, Transfer.start(tasks, gate.wait(), "swap-in", lambda: None))
        scheduler.finish(sequence)  # the client cancels while the KV is on its way back
        gate.set()
        await asyncio.sleep(0)
        plan = scheduler.schedule()
        assert (plan.run, plan.arrived, plan.failed) == ([], [], []) and sequence.state is State.FINISHED
        assert manager.used == 0
        await tasks.cancel_all()

    asyncio.run(scenario())


def test_failed_swap_out_falls_back_to_recompute() -> None:
    manager, scheduler = make(blocks=4, threshold=1.0)
    sequence = running(manager, scheduler, "s", prompt=10, at=1)
    scheduler.schedule()
    sequence.state = State.SWAPPING_OUT
    scheduler._running.remove(sequence)
    scheduler.copied_out(sequence)
    scheduler.watch(sequence, _failed())
    plan = scheduler.schedule()
    assert sequence.swapped is False and plan.swap_in == [sequence]  # resumes at once: nothing else runs


def _failed() -> Transfer[bool]:
    class Failed(Transfer[bool]):
        def poll(self) -> Poll:
            return Poll.FAILED

        def error(self) -> BaseException:
            return ConnectionError("kvstore unreachable")

    return Failed()


def test_sequence_over_its_budget_yields_to_others_but_never_to_nobody() -> None:
    manager, scheduler = make(blocks=16, threshold=1.0)
    budgeted = running(manager, scheduler, "budgeted", prompt=40, at=1)
    budgeted.budget_bytes = 10 * GEOMETRY.kv_bytes_per_token
    assert scheduler.schedule().run == [budgeted]  # alone: keeps running over its budget
    step(scheduler, [budgeted])
    other = running(manager, scheduler, "other", prompt=5, at=2)
    plan = scheduler.schedule()
    assert plan.swap_out == [budgeted] and plan.run == [other]


def test_resume_waits_until_it_fits_below_the_preempt_threshold() -> None:
    manager, scheduler = make(blocks=10, threshold=0.5)
    holder = running(manager, scheduler, "holder", prompt=60, at=1)  # 4 blocks (5 with its next token)
    waiting = admitted(manager, "waiting", prompt=20, at=2)
    waiting.generated.append(5)
    manager.free("waiting")
    scheduler._preempt_done(waiting, swapped=True)
    plan = scheduler.schedule()
    assert plan.swap_in == [] and plan.run == [holder]  # 5 + 2 blocks would be 70% > 50%
    scheduler.finish(holder)
    assert scheduler.schedule().swap_in == [waiting]


def test_a_write_on_a_revoked_lease_is_refused_and_a_newer_lease_wins() -> None:
    config = PoolConfig(4, BLOCK)
    manager, pool = BlockManager(config), BlockPool(config, GEOMETRY, torch.device("cpu"))
    lease = manager.allocate("a", 16)
    kv = torch.ones(GEOMETRY.num_kv_heads, 16, GEOMETRY.head_dim)
    old_writer = LeasedWriter(pool, manager, lease)
    old_writer.write(0, 0, kv, kv)
    new_writer = LeasedWriter(pool, manager, manager.renew("a"))  # a retried transfer takes over
    with pytest.raises(LeaseRevoked):
        old_writer.write(0, 0, kv * 2, kv * 2)
    new_writer.write(0, 0, kv * 3, kv * 3)
    manager.free("a")
    reused = manager.allocate("b", 16)  # the same block (the free list is LIFO)
    assert manager.table("b") == [0] and reused.epoch > new_writer.lease.epoch
    with pytest.raises(LeaseRevoked):
        new_writer.write(0, 0, kv * 4, kv * 4)
    assert torch.equal(pool.keys[0][0], (kv * 3).transpose(0, 1))  # untouched since the last valid write
