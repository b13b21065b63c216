"""Batch-invariant decode steps: with --batch-invariant every sequence's logits are bit-identical to
a batch of one (which equals Hugging Face's own forward pass) at any batch size; the default
batched step is not (matrix products over many rows round differently), which is why the mode
exists. The real model, the real paged pool, 24 sequences of different lengths."""

from __future__ import annotations

import torch

from services.decode.blocks import BlockManager
from services.decode.pool import BlockPool, PoolConfig
from services.decode.paged_runner import PagedRunner, StepSlot, rowwise_linear

BATCH = 24


def test_batch_invariant_step_is_bit_identical_to_a_batch_of_one(runtime) -> None:
    config = PoolConfig(128, 16)
    pool, blocks = BlockPool(config, runtime.geometry, runtime.device), BlockManager(config)
    generator = torch.Generator().manual_seed(0)
    slots = []
    for index in range(BATCH):
        prompt = torch.randint(100, 40000, (4 + 3 * index,), generator=generator).tolist()
        blocks.allocate(f"s{index}", len(prompt) + 1)
        table = blocks.table(f"s{index}")
        runtime.prefill(prompt, lambda layer, k, v, table=table: pool.write(table, layer, 0, k, v))
        slots.append(StepSlot(table, len(prompt), 1000 + index))
    saved = [(k.clone(), v.clone()) for k, v in zip(pool.keys, pool.values)]

    def step(runner: PagedRunner, batch: list[StepSlot]) -> torch.Tensor:
        for (keys, values), (k, v) in zip(saved, zip(pool.keys, pool.values)):
            k.copy_(keys)
            v.copy_(values)
        return runner.step(batch)

    default, invariant = PagedRunner(runtime, pool), PagedRunner(runtime, pool, batch_invariant=True)
    alone = torch.stack([step(default, [slot])[0] for slot in slots])
    assert torch.equal(step(invariant, slots), alone)
    assert torch.equal(step(invariant, slots[:5]), alone[:5])
    assert not torch.equal(step(default, slots), alone)  # what the mode is for


def test_rowwise_products_equal_a_batch_of_one_where_a_slice_is_not_whole_fours_of_rows() -> None:
    """MKL sums a matrix's last `rows mod 4` rows in another order than the rest (see
    services/decode/exact_gemv.py), so a weight slice whose row count is not a multiple of 4 gave
    its last rows other bits than the whole weight does for a batch of one: with 3,072 columns an
    8 MB slice is 682 rows (a Qwen2-0.5B MLP's down projection has 4,864)."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(1400, 3072, generator=generator)
    rows = torch.randn(3, 3072, generator=generator)
    alone = torch.cat([torch.nn.functional.linear(rows[i : i + 1], weight) for i in range(3)])
    assert torch.equal(rowwise_linear(rows, weight), alone)
