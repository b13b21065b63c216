"""Attention over the paged pool where the blocks lie: a stream alone attends over a view of its
blocks when they are one contiguous run, over a copy into the scratch buffer when they are
scattered; both are bit-identical to Hugging Face's own decode step over its cache. The batched
step's scratch buffers are reused across steps and give the same logits whatever they held."""

from __future__ import annotations

import pytest
import torch

from services.common.runtime import ModelRuntime
from services.decode.blocks import BlockManager
from services.decode.pool import BlockPool, PoolConfig
from services.decode.paged_runner import PagedRunner, StepSlot


@pytest.mark.parametrize("scattered", [False, True])
def test_a_stream_alone_is_bit_identical_to_hf_over_contiguous_and_scattered_blocks(tiny: ModelRuntime,
                                                                                     scattered: bool) -> None:
    config = PoolConfig(16, 4)
    pool, blocks = BlockPool(config, tiny.geometry, tiny.device), BlockManager(config)
    prompt = torch.randint(5, 200, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    blocks.allocate("s", len(prompt) + 4)
    table = blocks.table("s")[::-1] if scattered else blocks.table("s")  # reversed: no two blocks adjacent
    cache = tiny.new_cache()
    tiny.prefill(prompt, lambda layer, k, v: pool.write(table, layer, 0, k, v), cache)
    runner, token = PagedRunner(tiny, pool), 7
    with torch.inference_mode():
        for step in range(4):  # crosses a block boundary
            expected = tiny.model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1]
            assert torch.equal(runner.step([StepSlot(table, len(prompt) + step, token)])[0], expected)
            token = int(expected.argmax())


def test_batched_steps_reuse_their_scratch_buffers_without_leaking_between_steps(tiny: ModelRuntime) -> None:
    config = PoolConfig(32, 4)
    pool, blocks = BlockPool(config, tiny.geometry, tiny.device), BlockManager(config)
    slots = []
    for index, length in enumerate((3, 11, 6)):
        prompt = list(range(10 + index, 10 + index + length))
        blocks.allocate(f"s{index}", length + 1)
        table = blocks.table(f"s{index}")
        tiny.prefill(prompt, lambda layer, k, v, table=table: pool.write(table, layer, 0, k, v))
        slots.append(StepSlot(table, length, 50 + index))
    saved = [(k.clone(), v.clone()) for k, v in zip(pool.keys, pool.values)]

    def step(runner: PagedRunner, batch: list[StepSlot]) -> torch.Tensor:
        for (keys, values), (k, v) in zip(saved, zip(pool.keys, pool.values)):
            k.copy_(keys)
            v.copy_(values)
        return runner.step(batch)

    fresh = step(PagedRunner(tiny, pool), slots[:2])
    used = PagedRunner(tiny, pool)
    step(used, slots)  # a larger batch leaves other sequences' KV in the scratch buffers
    assert torch.equal(step(used, slots[:2]), fresh)


def test_profile_measures_decode_steps_on_the_paged_pool() -> None:
    """`python -m services.bench profile` times real decode steps: each slot carries its block table
    (it handed the runner the allocation's lease instead, and every decode measurement raised)."""
    from services.bench.profile import measure

    profile = measure("tiny", prompt_lengths=[8], batches=[1, 3], context=20)
    assert set(profile.decode_step_seconds) == {1, 3} and all(s > 0 for s in profile.decode_step_seconds.values())
    assert profile.prefill_tokens_per_s[8] > 0
