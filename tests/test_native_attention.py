"""The C attention kernel of batched decode steps (services/decode/native_attention.py): it computes
what SDPA computes over a copy of the blocks, within float32 rounding, for any lengths, scattered
blocks and grouped-query heads; it refuses a block outside the pool or a length outside the table;
it is built once per source, flags, head size and CPU (concurrent builds are safe); and where it
cannot be built `auto` falls back to SDPA while `native` refuses to start."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from services.common.errors import InternalFailure
from services.common.model_files import default_cache_dir
from services.common.runtime import ModelRuntime
from services.decode.__main__ import attention_mode
from services.decode.blocks import BlockManager
from services.decode.native_attention import NativeAttention
from services.decode.paged_runner import PagedRunner, StepSlot
from services.decode.pool import BlockPool, PoolConfig
from services.decode.settings import DecodeSettings

LENGTHS = (1, 5, 16, 17, 40)


def _kernel(runtime: ModelRuntime) -> NativeAttention:
    kernel = NativeAttention.build(runtime, default_cache_dir(), "native")
    assert kernel is not None
    return kernel


def _reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
               lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA over each sequence's blocks copied out of the pool, the way the batched step did it."""
    outputs = []
    for row, length in enumerate(lengths.tolist()):
        k = keys[tables[row]].flatten(0, 1)[:length].transpose(0, 1)[None]
        v = values[tables[row]].flatten(0, 1)[:length].transpose(0, 1)[None]
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            query[row : row + 1], k, v, scale=scale, enable_gqa=k.shape[1] != query.shape[1]))
    return torch.cat(outputs)


@pytest.mark.parametrize("model", ["tiny", "default"])
def test_the_kernel_equals_sdpa_over_copied_blocks(model: str, tiny: ModelRuntime, runtime: ModelRuntime) -> None:
    model_runtime = tiny if model == "tiny" else runtime
    kernel = _kernel(model_runtime)
    geometry = model_runtime.geometry
    heads, block_size, blocks = model_runtime.model.config.num_attention_heads, 16, 64
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(blocks, block_size, geometry.num_kv_heads, geometry.head_dim, generator=generator)
    values = torch.randn(keys.shape, generator=generator)
    width = -(-max(LENGTHS) // block_size)
    tables = torch.randperm(blocks, generator=generator)[: len(LENGTHS) * width].view(len(LENGTHS), width)
    lengths = torch.tensor(LENGTHS)
    query = torch.randn(len(LENGTHS), heads, 1, geometry.head_dim, generator=generator) * 3
    output = kernel.attend(query, keys, values, tables.contiguous(), lengths, geometry.head_dim ** -0.5)
    expected = _reference(query, keys, values, tables, lengths, geometry.head_dim ** -0.5)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def test_batched_steps_on_the_kernel_agree_with_sdpa_steps(tiny: ModelRuntime) -> None:
    config = PoolConfig(48, 4)
    pool, manager = BlockPool(config, tiny.geometry, tiny.device), BlockManager(config)
    slots = []
    for index, length in enumerate((3, 11, 6, 21)):
        prompt = list(range(10 + index, 10 + index + length))
        manager.allocate(f"s{index}", length + 1)
        table = manager.table(f"s{index}")[::-1]  # scattered
        tiny.prefill(prompt, lambda layer, k, v, table=table: pool.write(table, layer, 0, k, v))
        slots.append(StepSlot(table, length, 50 + index))
    saved = [(k.clone(), v.clone()) for k, v in zip(pool.keys, pool.values)]
    native = PagedRunner(tiny, pool, attention=_kernel(tiny)).step(slots)
    for (keys, values), (k, v) in zip(saved, zip(pool.keys, pool.values)):
        k.copy_(keys)
        v.copy_(values)
    gathered = PagedRunner(tiny, pool).step(slots)
    torch.testing.assert_close(native, gathered, rtol=1e-4, atol=1e-4)
    assert torch.equal(native.argmax(-1), gathered.argmax(-1))


@pytest.mark.parametrize("case, refusal", [("block", "a block outside the pool"),
                                           ("empty", "a sequence length outside its block table"),
                                           ("long", "a sequence length outside its block table")])
def test_the_kernel_refuses_what_lies_outside_the_pool(tiny: ModelRuntime, case: str, refusal: str) -> None:
    kernel, geometry = _kernel(tiny), tiny.geometry
    keys = torch.zeros(4, 16, geometry.num_kv_heads, geometry.head_dim)
    query = torch.zeros(1, tiny.model.config.num_attention_heads, 1, geometry.head_dim)
    tables, lengths = torch.tensor([[0, 1]]), torch.tensor([20])
    if case == "block":
        tables = torch.tensor([[0, 4]])
    else:
        lengths = torch.tensor([0 if case == "empty" else 33])
    with pytest.raises(InternalFailure, match=refusal):
        kernel.attend(query, keys, keys.clone(), tables, lengths, 0.25)


@pytest.mark.parametrize("case", ["head size", "dtype", "int32 tables", "rows"])
def test_attend_refuses_inputs_not_laid_out_as_the_kernel_reads_them(tiny: ModelRuntime, case: str) -> None:
    kernel, geometry = _kernel(tiny), tiny.geometry
    keys = torch.zeros(4, 16, geometry.num_kv_heads, geometry.head_dim)
    query = torch.zeros(2, tiny.model.config.num_attention_heads, 1, geometry.head_dim)
    tables, lengths = torch.tensor([[0, 1], [2, 3]]), torch.tensor([20, 9])
    if case == "head size":
        query = torch.zeros(2, query.shape[1], 1, geometry.head_dim // 2)
    elif case == "dtype":
        query = query.half()
    elif case == "int32 tables":
        tables = tables.int()
    else:
        lengths = torch.tensor([20])
    with pytest.raises(InternalFailure, match="not laid out as it reads them"):
        kernel.attend(query, keys, keys.clone(), tables, lengths, 0.25)


def test_a_cached_library_that_cannot_be_loaded_is_built_again(tiny: ModelRuntime, tmp_path: Path) -> None:
    assert NativeAttention.build(tiny, tmp_path / "first", "native") is not None
    (built,) = (tmp_path / "first" / "native").iterdir()
    assert built.stat().st_mode & 0o777 == 0o755  # other users sharing the cache load it too
    broken = tmp_path / "second" / "native" / built.name  # (never loaded here: a loaded one stays mapped)
    broken.parent.mkdir(parents=True)
    broken.write_bytes(built.read_bytes()[:100])  # cut short, as by a crash
    assert NativeAttention.build(tiny, tmp_path / "second", "native") is not None
    assert broken.stat().st_size == built.stat().st_size


def test_a_compiler_command_with_arguments_is_used_as_given(tiny: ModelRuntime, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "cc -w")
    assert NativeAttention.build(tiny, tmp_path, "native") is not None


def test_builds_at_once_into_a_new_cache_share_one_library(tiny: ModelRuntime, tmp_path: Path) -> None:
    built: list[NativeAttention | None] = []
    threads = [threading.Thread(target=lambda: built.append(NativeAttention.build(tiny, tmp_path, "native")))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(built) == 3 and all(kernel is not None for kernel in built)
    assert [path.suffix for path in (tmp_path / "native").iterdir()] == [".so"]  # no partial file is left


def test_without_a_compiler_auto_falls_back_and_native_refuses(tiny: ModelRuntime, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-compiler")
    assert NativeAttention.build(tiny, tmp_path, "auto") is None
    with pytest.raises(ValueError, match="no C compiler"):
        NativeAttention.build(tiny, tmp_path, "native")
    assert NativeAttention.build(tiny, tmp_path, "sdpa") is None


def test_a_model_the_kernel_does_not_take_falls_back(tmp_path: Path) -> None:
    bf16 = ModelRuntime("tiny", "bfloat16", "cpu", default_cache_dir())
    assert NativeAttention.build(bf16, tmp_path, "auto") is None
    with pytest.raises(ValueError, match="float32"):
        NativeAttention.build(bf16, tmp_path, "native")


def test_the_setting_is_checked_and_batch_invariant_steps_do_not_use_it() -> None:
    with pytest.raises(ValueError, match="paged_attention must be one of auto, native, sdpa"):
        DecodeSettings(paged_attention="fast")
    assert attention_mode(DecodeSettings(batch_invariant=True, packed_weights="batched")) == "sdpa"
    assert attention_mode(DecodeSettings()) == "auto"
