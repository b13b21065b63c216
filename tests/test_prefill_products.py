"""--prefill-products (services/prefill/exact_products.py): the prefill's matrix products by the
panel kernel with k summed in blocks, bit-identical to torch's. The order is read off at start; the
kernel then equals F.linear bit for bit at every row count (fewer rows than the order holds for go
through F.linear), a real prompt's KV and logits are torch's to the bit, and bad settings get a
clear error. The services' exactness tests (tests/test_exactness.py) run with the default, auto."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from services.common.errors import InternalFailure
from services.common.model_files import default_cache_dir
from services.common.runtime import ModelRuntime
from services.decode.exact_gemv import same_bits
from services.decode.panel_products import PanelKernel
from services.prefill import exact_products
from services.prefill.exact_products import ExactLinear, SumOrder, read_order
from services.prefill.settings import PrefillSettings
from tests.conftest import reference_model

SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in) of its decoder's layers
MKL = torch.backends.mkl.is_available()


@pytest.fixture(scope="module")
def kernel() -> PanelKernel:
    built = PanelKernel.build(default_cache_dir())
    if isinstance(built, str):
        pytest.skip(f"the panel kernel cannot be built here: {built}")
    return built


@pytest.mark.parametrize(("out_features", "in_features"), SMOLLM2_SHAPES)
def test_the_order_is_read_off_and_the_kernel_then_equals_f_linear_bit_for_bit(
        kernel: PanelKernel, out_features: int, in_features: int) -> None:
    generator = torch.Generator().manual_seed(5)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.inference_mode():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator))
        order = read_order(kernel, linear.weight)
        if order is None:
            if MKL:
                pytest.fail("MKL's summation order was not read off (a BLAS build that sums otherwise?)")
            pytest.skip("torch's BLAS here sums in an order the kernel does not know")
        exact = ExactLinear(linear, kernel, order)
        for rows in (1, 2, 3, *range(order.min_rows, order.min_rows + 8), 33, 100, 300):
            x = torch.randn(2, rows, in_features, generator=generator)[1]  # a batch dimension, as HF's
            assert same_bits(exact(x[None]), F.linear(x[None], linear.weight)), f"{rows} rows"


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

    torch_logits, torch_kv = prefilled()
    replaced = exact_products.install(runtime.model, runtime.device, default_cache_dir(), "native")
    if replaced == 0 and not MKL:
        pytest.skip("no weight shape's order matched torch's BLAS here")
    assert replaced == 7 * runtime.geometry.num_layers  # q, k, v, o, gate, up, down of every layer
    logits, kv = prefilled()
    assert same_bits(logits, torch_logits)
    assert len(kv) == len(torch_kv) and all(same_bits(a, b) for a, b in zip(kv, torch_kv))


def test_auto_times_both_and_says_which_it_keeps_and_torch_replaces_nothing(
        tiny: ModelRuntime, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="services.prefill.exact_products")
    runtime = reference_model("tiny")
    assert exact_products.install(runtime.model, runtime.device, default_cache_dir(), "torch") == 0
    exact_products.install(runtime.model, runtime.device, default_cache_dir(), "auto")
    assert "panel kernel" in caplog.text and "torch" in caplog.text and " ms" in caplog.text


def test_the_kernel_refuses_a_block_size_below_one(kernel: PanelKernel) -> None:
    weight = torch.ones(4, 8)
    with pytest.raises(InternalFailure, match="refused its sizes"):
        kernel.product(torch.ones(5, 8), kernel.pack(weight), 4, block=-1)
    assert same_bits(kernel.product(torch.ones(5, 8), kernel.pack(weight), 4, block=3), torch.full((5, 4), 8.0))


def test_bad_prefill_products_settings_are_refused(tiny: ModelRuntime) -> None:
    with pytest.raises(ValueError, match="prefill_products must be one of \\['auto', 'native', 'torch'\\], got 'fast'"):
        PrefillSettings(prefill_products="fast")
    with pytest.raises(ValueError, match="prefill_products must be one of auto, native, torch, got 'on'"):
        exact_products.install(tiny.model, tiny.device, default_cache_dir(), "on")


def test_fewer_rows_than_the_order_holds_for_go_through_f_linear(kernel: PanelKernel) -> None:
    linear = torch.nn.Linear(64, 40, bias=False)
    exact = ExactLinear(linear, kernel, SumOrder(block=1, min_rows=10))  # a block size no BLAS uses
    x = torch.randn(9, 64)
    with torch.inference_mode():
        assert same_bits(exact(x), F.linear(x, linear.weight))
        many = torch.randn(10, 64)
        assert same_bits(exact(many), kernel.product(many, kernel.pack(linear.weight.detach()), 40, block=1))
