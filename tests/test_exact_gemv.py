"""The exact gemv kernel (--gemv): a batch of one's products in C, bit-identical to F.linear (the
BLAS's own summation order) at every row alignment, through the whole model and in the running
decode; what it cannot reproduce keeps F.linear; bad settings are refused."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from services.common.errors import InternalFailure
from services.common.model_files import default_cache_dir
from services.common.runtime import ModelRuntime
from services.decode import exact_gemv
from services.decode.exact_gemv import ExactGemv, ExactGemvLinear, same_bits
from services.decode.settings import DecodeSettings
from tests.conftest import RunningStack, reference_model
from tests.gemv_helpers import built_kernel, counted, needs_the_blas_order


def _at_offset(rows: int, columns: int, offset: int, generator: torch.Generator) -> torch.Tensor:
    """Random weights [rows, columns] starting `offset` floats past a 64-byte boundary."""
    storage = torch.randn(rows * columns + 32, generator=generator)
    start = (-(storage.data_ptr() // 4)) % 16 + offset
    return storage[start : start + rows * columns].view(rows, columns)


@needs_the_blas_order
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4])
@pytest.mark.parametrize(("rows", "columns"), [(1536, 576), (576, 1536), (8, 100), (300, 64), (12, 8)])
def test_the_kernel_equals_f_linear_bit_for_bit_at_every_row_alignment(rows: int, columns: int,
                                                                        offset: int) -> None:
    kernel = built_kernel()
    generator = torch.Generator().manual_seed(rows * 1000 + columns + offset)
    weight = _at_offset(rows, columns, offset, generator)
    for scale in (1.0, 1e-4, 1e4):
        x = torch.randn(columns, generator=generator) * scale
        assert same_bits(kernel.product(weight, x), F.linear(x[None], weight)[0])


@needs_the_blas_order
def test_rows_whose_stride_is_not_whole_fours_of_floats_are_left_to_f_linear() -> None:
    """MKL starts such rows' sums elsewhere (measured, not reproduced): the kernel refuses them."""
    kernel = built_kernel()
    weight = _at_offset(64, 579, 0, torch.Generator().manual_seed(4))[:, :576]
    assert not kernel.supports(weight) and kernel.supports(_at_offset(64, 580, 0, torch.Generator())[:, :576])
    with pytest.raises(InternalFailure):
        kernel.product(weight, torch.randn(576))


@needs_the_blas_order
def test_sums_that_cancel_exactly_come_out_as_the_blas_gives_them() -> None:
    """The probes the order was read off with: a large value, a one and the large value negated;
    the one survives only where the two large values meet before it."""
    kernel = built_kernel()
    big, columns = 2.0**24, 64
    rows = [(i, j, k) for i in range(0, 12) for j in range(0, 12) for k in (4, 9, 30, 62, 63) if len({i, j, k}) == 3]
    for offset in (0, 2):
        weight = _at_offset(len(rows), columns, offset, torch.Generator().manual_seed(2))
        weight.zero_()
        for row, (i, j, k) in enumerate(rows):
            weight[row, i], weight[row, j], weight[row, k] = big, 1.0, -big
        expected = F.linear(torch.ones(1, columns), weight)[0]
        assert same_bits(kernel.product(weight, torch.ones(columns)), expected)
        assert 0 < int((expected == 1.0).sum()) < len(rows)  # the order decides: some ones survive, some not


def _greedy_logits(model: torch.nn.Module, prompt: list[int], steps: int) -> torch.Tensor:
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        logits = [model(torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits[:, -1]]
        for _ in range(steps):
            token = logits[-1].argmax(-1, keepdim=True)
            logits.append(model(token, past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.cat(logits)


@needs_the_blas_order
def test_a_stream_alone_through_the_kernel_is_bit_identical_to_hugging_face(runtime: ModelRuntime) -> None:
    fast = reference_model("default").model  # its own copy: the session's reference stays untouched
    assert exact_gemv.install(fast, default_cache_dir(), "native").layers == 211  # 30 layers x 7, and the LM head
    assert isinstance(fast.lm_head, ExactGemvLinear)
    assert fast.lm_head.weight is fast.model.embed_tokens.weight  # tied weights stay tied, not copied
    calls = counted(fast.lm_head._kernel)
    prompt = [1, 504, 3458, 282, 4649, 314]
    assert same_bits(_greedy_logits(fast, prompt, 12), _greedy_logits(runtime.model, prompt, 12))
    assert len(calls) == 12 * 211  # each one-token step ran every layer on the kernel; the prompt on F.linear


@needs_the_blas_order
def test_rows_batches_and_autograd_go_through_f_linear() -> None:
    kernel = built_kernel()
    linear = torch.nn.Linear(64, 32, bias=False)
    wrapped = ExactGemvLinear(linear, kernel)
    rows = torch.randn(3, 64)
    with torch.inference_mode():
        assert torch.equal(wrapped(rows), F.linear(rows, linear.weight))
        assert wrapped(rows[:1, None]).shape == (1, 1, 32)
    assert wrapped(rows[:1]).grad_fn is not None  # outside inference the graph is kept: F.linear ran
    weight, strided = linear.weight.detach(), torch.randn(64, 3)[:, 1]  # a row with a stride: read as its values
    assert same_bits(kernel.product(weight, strided), F.linear(strided[None], weight)[0])
    with pytest.raises(InternalFailure, match="not the weight's width"):
        kernel.product(weight, torch.randn(63))  # never a read past the row's end
    wrapped.to(torch.float64)  # a module cast after install: its weight is no longer the one checked
    with torch.inference_mode():
        assert wrapped(rows[:1].double()).dtype == torch.float64


@needs_the_blas_order
def test_layers_the_kernel_cannot_reproduce_keep_f_linear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # one thread: no timing against MKL's threads
    model = torch.nn.Sequential(torch.nn.Linear(64, 16, bias=False), torch.nn.Linear(16, 16),
                                torch.nn.Linear(16, 4, bias=False).to(torch.float64), torch.nn.Linear(4, 8, bias=False),
                                torch.nn.Linear(8, 6, bias=False))
    assert exact_gemv.install(model, default_cache_dir(), "auto").layers == 2
    assert isinstance(model[0], ExactGemvLinear) and isinstance(model[1], ExactGemvLinear)  # a bias is fine
    # float64, 4 columns, 6 rows (MKL sums a matrix's last n mod 4 rows another way)
    assert [type(layer) for layer in model[2:]] == [torch.nn.Linear] * 3
    with pytest.raises(ValueError, match="--gemv native cannot be used here: 3 of 4 linear layers"):
        exact_gemv.install(torch.nn.Sequential(*model[2:], torch.nn.Linear(64, 8, bias=False)), tmp_path, "native")
    assert exact_gemv.install(torch.nn.Sequential(torch.nn.Linear(64, 8, bias=False)), tmp_path, "torch").layers == 0


@needs_the_blas_order
@pytest.mark.parametrize("offset", [0, 2])
def test_a_layer_with_a_bias_adds_it_after_the_sum_as_mkl_does(offset: int) -> None:
    """F.linear with a bias is MKL's sum, then the bias added (beta = 1): Qwen2's q/k/v take the kernel too."""
    kernel = built_kernel()
    generator = torch.Generator().manual_seed(7 + offset)
    linear = torch.nn.Linear(576, 192)
    with torch.no_grad():
        linear.weight = torch.nn.Parameter(_at_offset(192, 576, offset, generator))
        linear.bias.copy_(torch.randn(192, generator=generator) * 10)
    assert kernel.agrees(linear.weight.detach(), linear.bias.detach())
    wrapped = ExactGemvLinear(linear, kernel)
    calls = counted(kernel)
    x = torch.randn(1, 1, 576, generator=generator)
    with torch.inference_mode():
        assert same_bits(wrapped(x), F.linear(x, linear.weight, linear.bias)) and len(calls) == 1
        other = torch.nn.Parameter(torch.randn(192, generator=generator))
        wrapped.bias = other  # another bias since the check: F.linear takes the layer, with that bias
        assert same_bits(wrapped(x), F.linear(x, linear.weight, other)) and len(calls) == 1
    nan_sum = torch.nn.Linear(64, 8)
    with torch.no_grad():
        nan_sum.weight[0, :2] = torch.tensor([float("inf"), float("-inf")])
        nan_sum.bias.fill_(float("nan"))  # both NaN: MKL keeps the sum's NaN, not the bias's
    with torch.inference_mode():
        assert same_bits(ExactGemvLinear(nan_sum, kernel)(torch.ones(64)), F.linear(torch.ones(64), nan_sum.weight,
                                                                                   nan_sum.bias))


@needs_the_blas_order
def test_a_weight_laid_out_anew_in_place_since_the_check_goes_to_f_linear() -> None:
    """Same Parameter, same address, other strides: the kernel would read it as rows (or past its end)."""
    kernel = built_kernel()
    linear = torch.nn.Linear(64, 8, bias=False)
    wrapped = ExactGemvLinear(linear, kernel)
    linear.weight.data = linear.weight.data.as_strided((8, 64), (64, 0))
    x = torch.randn(64)
    with torch.inference_mode():
        assert same_bits(wrapped(x), F.linear(x, linear.weight))


def _fastest(weight: torch.Tensor | None) -> ExactGemv:
    kernel = ExactGemv.fastest(default_cache_dir(), weight)
    assert isinstance(kernel, ExactGemv)
    return kernel


@needs_the_blas_order
def test_every_prefetch_hint_gives_the_same_bits_and_the_faster_on_the_largest_layer_is_kept(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Which hint reads memory fastest differs between machines of one kind (NTA or T2 ahead by
    1.4x on two EPYCs): both are built and timed; neither changes a bit."""
    weight = _at_offset(1536, 576, 2, torch.Generator().manual_seed(9))
    x = torch.randn(576, generator=torch.Generator().manual_seed(10))
    kernels = [built_kernel(hint) for hint in exact_gemv.PREFETCH_HINTS]
    for kernel in kernels:
        assert same_bits(kernel.product(weight, x), F.linear(x[None], weight)[0])
    assert len({ctypes.cast(kernel._kernel, ctypes.c_void_p).value for kernel in kernels}) == len(kernels)  # two builds
    assert _fastest(weight).hint in exact_gemv.PREFETCH_HINTS  # the real timing runs
    for timings, chosen in (((2.0, 1.0), "nta"), ((1.0, 2.0), "t2")):  # the hints' times, in PREFETCH_HINTS order
        times = iter(timings)
        monkeypatch.setattr(exact_gemv, "_seconds", lambda run, times=times: (run(), next(times))[1])
        with caplog.at_level("INFO", logger="services.decode.exact_gemv"):
            assert _fastest(weight).hint == chosen
        assert f"exact gemv kernel: prefetch hint {chosen} (t2 {timings[0] * 1e3:.2f} ms, nta " in caplog.text
    assert _fastest(None).hint == "t2"  # nothing to time: the default


def test_a_bad_gemv_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="gemv must be one of auto, native, torch, got 'fast'"):
        DecodeSettings(gemv="fast")
    with pytest.raises(ValueError, match="gemv must be one of"):
        exact_gemv.install(torch.nn.Sequential(), default_cache_dir(), "on")


@needs_the_blas_order
def test_the_running_decode_computes_a_stream_alone_with_the_kernel(memory_stack: RunningStack) -> None:
    """The stack the greedy exactness tests run against (tests/test_exactness.py) uses the kernel."""
    assert memory_stack.stack.log_dir is not None
    log = (Path(memory_stack.stack.log_dir) / "decode.log").read_text()
    assert "a batch of one computes 211 of 211 linear layers with the exact gemv kernel" in log


@needs_the_blas_order
def test_with_several_threads_auto_keeps_f_linear_where_that_is_faster(monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """MKL on several cores may outrun the one-thread kernel: `auto` times both on the largest layer."""
    kernel = built_kernel()
    assert kernel.faster(torch.randn(49152, 576)) in (True, False)  # the real timing runs
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(ExactGemv, "faster", lambda self, weight: False)
    layers = torch.nn.Sequential(torch.nn.Linear(64, 16, bias=False))
    with caplog.at_level("INFO", logger="services.decode.exact_gemv"):
        assert exact_gemv.install(layers, default_cache_dir(), "auto").layers == 0
    assert "F.linear on 4 threads is faster here" in caplog.text
    assert exact_gemv.install(layers, default_cache_dir(), "native").layers == 1  # asked for: no timing

