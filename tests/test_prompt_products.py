"""--prefill-products (services/decode/prompt_products.py): the prefill's matrix products by the
panel kernel with k summed in blocks, bit-identical to torch's. The order is read off at start; the
kernel then equals F.linear bit for bit at every row count (fewer rows than the order holds for go
through F.linear), a real prompt's KV, logits and scores (every row through the LM head) are
torch's to the bit, and bad settings get a clear error. A decode lends the panels of its batched
steps to its modules, whose prefills keep the bits. The services' exactness tests
(tests/test_exactness.py) run with the default, auto."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from services.common.errors import InternalFailure
from services.common.logprobs import TokenLogprob
from services.common.model_files import default_cache_dir
from services.common.runtime import ModelRuntime
from services.common.packed_weights import PackedWeights
from services.decode import exact_gemv
from services.decode.exact_gemv import ExactGemvLinear, same_bits
from services.decode.panel_products import PanelKernel
from services.decode import prompt_products
from services.decode.prompt_products import ExactLinear, RowsProduct, SumOrder, read_order
from services.decode.settings import DecodeSettings
from services.prefill.settings import PrefillSettings
from tests.conftest import reference_model

SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in) of its decoder's layers
MKL = torch.backends.mkl.is_available()
CPUINFO = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else ""
# MKL's order was read off on an AMD Zen 5 (family 26), where these tests must find it; elsewhere (an
# Intel CPU's AVX-512 code, say) it may be one the kernel does not know, and they skip
ORDER_KNOWN = MKL and "AuthenticAMD" in CPUINFO and re.search(r"^cpu family\s*:\s*26$", CPUINFO, re.M) is not None


def needs_the_order(found: object) -> None:
    if not found:
        if ORDER_KNOWN:
            pytest.fail("MKL's summation order was not read off on an AMD CPU (the kernel or the probes broke?)")
        pytest.skip("torch's BLAS here sums in an order the kernel does not know")


@pytest.mark.parametrize(("out_features", "in_features"), SMOLLM2_SHAPES)
def test_the_order_is_read_off_and_the_kernel_then_equals_f_linear_bit_for_bit(
        kernel: PanelKernel, out_features: int, in_features: int) -> None:
    generator = torch.Generator().manual_seed(5)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.inference_mode():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator))
        panels = kernel.pack(linear.weight)
        order = read_order(kernel, linear.weight, panels)
        needs_the_order(order)
        assert order is not None and order.max_rows == 2048  # a whole prefill chunk was probed
        exact = ExactLinear(linear, RowsProduct(kernel, panels, linear.weight, order))
        for rows in (1, 2, 3, *range(order.min_rows, order.min_rows + 8), 33, 100, 300, 2048, 2049):
            x = torch.randn(2, rows, in_features, generator=generator)[1]  # a batch dimension, as HF's
            assert same_bits(exact(x[None]), F.linear(x[None], linear.weight)), f"{rows} rows"
            taken = exact.rows(x[None], linear.weight) is not None
            assert taken == (order.min_rows <= rows <= order.max_rows), f"{rows} rows"


@pytest.mark.parametrize(("rows", "out_features", "in_features", "block"),
                         [(7, 40, 100, 32), (13, 70, 200, 64), (6, 33, 97, 96), (5, 8, 30, 7)])
def test_blocked_sums_with_partial_panels_and_a_short_last_block_are_the_products(
        kernel: PanelKernel, rows: int, out_features: int, in_features: int, block: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    got = kernel.product(x, kernel.pack(weight), out_features, block)
    exact = (x.double() @ weight.double().t()).float()
    assert torch.allclose(got, exact, rtol=1e-5, atol=1e-5)
    # and in that order: each block summed alone, the blocks' sums added in turn
    blocks = [kernel.product(x[:, k0:k0 + block].contiguous(), kernel.pack(weight[:, k0:k0 + block].contiguous()),
                             out_features) for k0 in range(0, in_features, block)]
    total = blocks[0]
    for part in blocks[1:]:
        total = total + part
    assert same_bits(got, total)


def test_a_prompt_prefilled_on_the_kernel_has_torchs_kv_and_logits_bit_for_bit() -> None:
    runtime = reference_model("default")  # its own copy: the shared reference stays untouched
    prompt = [(7 * i) % 40_000 + 100 for i in range(70)]
    chunks = ([*prompt[:64]], prompt[64:])  # a chunk of whole blocks, then one of six rows

    def prefilled() -> tuple[torch.Tensor, list[torch.Tensor]]:
        kv: list[torch.Tensor] = []
        cache = runtime.new_cache()
        logits = torch.empty(0)
        for chunk in chunks:
            logits = runtime.prefill(chunk, lambda _layer, keys, values: kv.extend((keys.clone(), values.clone())),
                                     cache)
        return logits, kv

    def scored() -> list[TokenLogprob]:
        return runtime.prefill_scored(prompt, lambda *_: None, prompt[1:], 2)[1]

    torch_logits, torch_kv, torch_scores = *prefilled(), scored()
    replaced = prompt_products.install(runtime.model, runtime.device, default_cache_dir(), "native")
    needs_the_order(replaced)
    assert replaced == 7 * runtime.geometry.num_layers + 1  # q, k, v, o, gate, up, down of every layer; the head
    down = runtime.model.model.layers[-1].mlp.down_proj
    assert isinstance(down, ExactLinear)
    kernel_rows, taken = down.rows, []

    def recorded(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        out = kernel_rows(x, weight)
        taken.append(0 if out is None else x.numel() // x.shape[-1])
        return out

    down.rows = recorded  # type: ignore[assignment]
    logits, kv = prefilled()
    order = kernel_rows._order  # under 2 torch threads MKL sums 5-11 rows otherwise: those keep F.linear
    assert taken == [len(chunk) if order.min_rows <= len(chunk) <= order.max_rows else 0 for chunk in chunks]
    assert taken[0] == 64  # the first chunk's rows went through the kernel
    assert same_bits(logits, torch_logits)
    assert len(kv) == len(torch_kv) and all(same_bits(a, b) for a, b in zip(kv, torch_kv))
    assert scored() == torch_scores


def test_auto_times_both_and_says_which_it_keeps_and_torch_replaces_nothing(
        kernel: PanelKernel, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="services.decode.prompt_products")
    runtime = reference_model("tiny")
    assert prompt_products.install(runtime.model, runtime.device, default_cache_dir(), "torch") == 0
    assert "prompt products" not in caplog.text
    prompt_products.install(runtime.model, runtime.device, default_cache_dir(), "auto")
    needs_the_order("no order matched" not in caplog.text and "match no weight shape" not in caplog.text)
    assert "rows through one layer of each shape: the panel kernel" in caplog.text and " ms" in caplog.text


def test_the_kernel_refuses_a_block_size_below_one(kernel: PanelKernel) -> None:
    weight = torch.ones(4, 8)
    with pytest.raises(InternalFailure, match="refused its sizes"):
        kernel.product(torch.ones(5, 8), kernel.pack(weight), 4, block=-1)
    assert same_bits(kernel.product(torch.ones(5, 8), kernel.pack(weight), 4, block=3), torch.full((5, 4), 8.0))


def test_exact_linear_is_a_drop_in_for_a_bias_free_linear(kernel: PanelKernel) -> None:
    linear = torch.nn.Linear(64, 40, bias=False)
    exact = ExactLinear(linear, RowsProduct(kernel, kernel.pack(linear.weight.detach()), linear.weight,
                                            SumOrder(64, 4, 2048)))
    assert exact.bias is None and exact.weight is linear.weight  # batch-invariant steps read both
    assert (exact.in_features, exact.out_features) == (64, 40)


def test_bad_prefill_products_settings_are_refused(tiny: ModelRuntime) -> None:
    for settings in (PrefillSettings, DecodeSettings):
        with pytest.raises(ValueError, match="prefill_products must be one of auto, native, torch, got 'fast'"):
            settings(prefill_products="fast")
    with pytest.raises(ValueError, match="prefill_products must be one of auto, native, torch, got 'on'"):
        prompt_products.install(tiny.model, tiny.device, default_cache_dir(), "on")


def test_rows_outside_the_order_or_recorded_by_autograd_go_through_f_linear(kernel: PanelKernel) -> None:
    linear = torch.nn.Linear(64, 40, bias=False)
    order = SumOrder(block=1, min_rows=10, max_rows=12)  # a block size no BLAS uses: its bits tell
    exact = ExactLinear(linear, RowsProduct(kernel, kernel.pack(linear.weight.detach()), linear.weight, order))
    with torch.inference_mode():
        for rows in (9, 13):
            x = torch.randn(rows, 64)
            assert same_bits(exact(x), F.linear(x, linear.weight)), f"{rows} rows"
        inside = torch.randn(11, 64)
        assert same_bits(exact(inside), kernel.product(inside, kernel.pack(linear.weight.detach()), 40, block=1))
    recorded = exact(torch.randn(11, 64))  # the weight wants its gradient: autograd must see the product
    assert recorded.grad_fn is not None


def test_a_decode_lends_its_batched_steps_panels_to_its_gemv_modules_and_keeps_the_bits(
        kernel: PanelKernel) -> None:
    runtime = reference_model("default")
    prompt = [(11 * i) % 40_000 + 100 for i in range(40)]
    packed = PackedWeights.build(runtime.model, runtime.device, "batched", kernel)
    if packed is None:
        pytest.skip("no weight packing here")
    try:
        installed = exact_gemv.install(runtime.model, default_cache_dir(), "native").layers
    except ValueError as error:
        pytest.skip(f"a decode's modules stay nn.Linear here: {error}")
    torch_logits = runtime.prefill(prompt, lambda *_: None)
    given = prompt_products.install(runtime.model, runtime.device, default_cache_dir(), "native", packed,
                                    on_decode=True)
    needs_the_order(given)
    assert given == installed == 7 * runtime.geometry.num_layers + 1
    first = runtime.model.model.layers[0]
    assert isinstance(first.self_attn.v_proj, ExactGemvLinear) and first.self_attn.v_proj.rows is not None
    qkv = packed.layers[0].qkv.weight  # fused q, k, v panels: v's are the last of them, not a copy
    v_panels = first.self_attn.v_proj.rows._panels
    assert v_panels.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert v_panels.data_ptr() == qkv[-(192 // kernel.width):].data_ptr()
    assert runtime.model.lm_head.rows._panels.data_ptr() == packed.lm_head.weight.data_ptr()
    for module in runtime.model.modules():  # every lent view holds its layer's own weights
        if isinstance(module, ExactGemvLinear) and module.rows is not None:
            lent_panels, own = module.rows._panels, kernel.pack(module.weight.detach())
            assert lent_panels.shape == own.shape
            assert torch.equal(lent_panels.flatten(0, 1)[:, : module.out_features % kernel.width or kernel.width],
                               own.flatten(0, 1)[:, : module.out_features % kernel.width or kernel.width])
            assert torch.equal(lent_panels[:-1], own[:-1])
    lent = first.self_attn.v_proj.rows
    taken: list[int] = []

    def recorded(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        out = lent(x, weight)
        taken.append(0 if out is None else x.numel() // x.shape[-1])
        return out

    first.self_attn.v_proj.rows = recorded
    assert same_bits(runtime.prefill(prompt, lambda *_: None), torch_logits)
    assert taken == [len(prompt)]  # the prompt's rows went through the kernel


def test_a_decode_swaps_no_module_and_auto_makes_no_copy_without_lent_panels(tiny: ModelRuntime) -> None:
    runtime = reference_model("tiny")
    modules = list(runtime.model.modules())
    # modules that are plain nn.Linear (--gemv torch) are read by the one-stream path and batch-invariant
    # steps as they are: a decode leaves them
    assert prompt_products.install(runtime.model, runtime.device, default_cache_dir(), "auto", None,
                                   on_decode=True) == 0
    with pytest.raises(ValueError, match="native cannot be used here: no linear layer it can take .* see --gemv"):
        prompt_products.install(runtime.model, runtime.device, default_cache_dir(), "native", None, on_decode=True)
    assert list(runtime.model.modules()) == modules
    try:
        exact_gemv.install(runtime.model, default_cache_dir(), "native")
    except ValueError as error:
        pytest.skip(f"a decode's modules stay nn.Linear here: {error}")
    assert prompt_products.install(runtime.model, runtime.device, default_cache_dir(), "auto", None,
                                   on_decode=True) == 0  # nothing lent: no second copy of the weights
    assert all(module.rows is None for module in runtime.model.modules() if isinstance(module, ExactGemvLinear))


def test_a_weight_changed_after_its_panels_were_made_goes_through_f_linear(kernel: PanelKernel) -> None:
    linear = torch.nn.Linear(64, 40, bias=False)
    exact = ExactLinear(linear, RowsProduct(kernel, kernel.pack(linear.weight.detach()), linear.weight,
                                            SumOrder(64, 4, 2048)))
    x = torch.randn(8, 64)
    with torch.inference_mode():
        assert exact.rows(x, linear.weight) is not None
    with torch.no_grad():
        linear.weight.mul_(2)  # in place: the panels hold the old values
    with torch.inference_mode():
        assert exact.rows(x, linear.weight) is None and same_bits(exact(x), F.linear(x, linear.weight))
