"""The decode engine in-process with the tiny model: a failing step fails only its own sequences
and the loop goes on; a loop that ends is reported as fatal; a local prefill of a cancelled
request never writes into blocks that were handed to another request. Faults are injected into
the real engine (a step that raises, a scheduler that raises); the model and the pool are real."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from services.common.errors import InternalFailure
from services.decode.blocks import LeasedWriter
from services.decode.sequence import Finished
from tests.engine_harness import PROMPT


async def test_a_failing_step_fails_only_its_own_sequences_and_the_loop_goes_on(harness, tiny) -> None:
    engine = harness.engine
    real_step, calls = engine._runner.step, []

    def step_that_fails_once(slots: list) -> torch.Tensor:
        calls.append(len(slots))
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real_step(slots)

    engine._runner.step = step_that_fails_once
    doomed = harness.admit("doomed")
    engine.prefill_locally(doomed)
    with pytest.raises(InternalFailure, match="injected fault"):
        await harness.tokens(doomed)
    engine.release(doomed)
    survivor = harness.admit("survivor")
    engine.prefill_locally(survivor)
    assert await harness.tokens(survivor) == tiny.reference_generate(PROMPT, 6)
    engine.release(survivor)
    assert harness.fatal == [] and engine.blocks.used == 0


async def test_a_loop_that_ends_is_reported_as_fatal(harness) -> None:
    engine = harness.engine

    def broken_schedule() -> None:
        raise RuntimeError("scheduler bug")

    engine._scheduler.schedule = broken_schedule
    sequence = harness.admit("any")
    engine.prefill_locally(sequence)
    for _ in range(200):
        if harness.fatal:
            break
        await asyncio.sleep(0.01)
    assert harness.fatal and "scheduler bug" in harness.fatal[0]


async def test_a_cancelled_local_prefill_never_writes_into_blocks_handed_to_another_request(harness) -> None:
    engine, gate = harness.engine, threading.Event()
    blocker = asyncio.ensure_future(harness.thread.run(gate.wait, 30))  # the model thread is busy
    cancelled = harness.admit("cancelled", prompt=PROMPT * 5)
    engine.prefill_locally(cancelled)  # queued behind the blocker
    cancelled_blocks = list(engine.blocks.table("cancelled"))
    engine.release(cancelled)  # the client went away before the prefill ran
    heir = harness.admit("heir", prompt=PROMPT * 5)
    assert engine.blocks.table("heir") == cancelled_blocks  # the same blocks, handed straight on
    marker = torch.full((2, len(PROMPT) * 5, 16), 7.0)
    writer = LeasedWriter(engine._pool, engine.blocks, heir.lease)
    for layer in range(4):
        writer.write(layer, 0, marker, marker)
    gate.set()
    await blocker
    await harness.thread.run(lambda: None)  # the cancelled prefill has run (and been refused)
    for layer in range(4):
        keys, values = engine._pool.read(engine.blocks.table("heir"), layer, len(PROMPT) * 5)
        assert torch.equal(keys, marker) and torch.equal(values, marker)
    engine.release(heir)
    assert engine.blocks.used == 0


async def test_a_finished_sequence_reports_its_finish(harness, tiny) -> None:
    sequence = harness.admit("plain", max_tokens=3)
    harness.engine.prefill_locally(sequence)
    events = [event async for event in harness.engine.events(sequence)]
    harness.engine.release(sequence)
    assert events[-1] == Finished("length", 3)
    assert [e.token_id for e in events[:-1]] == tiny.reference_generate(PROMPT, 3)
