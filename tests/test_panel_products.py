"""The panel kernel of batched steps (--batched-products, services/decode/panel_products.py): its
products agree with F.linear for every shape (partial panels, row counts that are no multiple of
its six), mislaid inputs are refused, `auto` times both kernels and says which it keeps, and bad
settings or an unbuildable kernel get a clear error. Batched steps and fused parts on it are
tested with oneDNN's layout in tests/test_packed_weights.py."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from services.common.errors import InternalFailure
from services.common.model_files import default_cache_dir
from services.common.packed_weights import PackedWeights, packing_unsupported
from services.common.runtime import ModelRuntime
from services.decode import panel_products
from services.decode.__main__ import products_mode
from services.decode.panel_products import PanelKernel
from services.decode.settings import DecodeSettings

pytestmark = pytest.mark.skipif(packing_unsupported(torch.device("cpu"), torch.float32) is not None,
                                reason="no oneDNN weight packing in this torch build")


@pytest.mark.parametrize("rows", [0, 1, 2, 5, 6, 7, 13, 32, 33])
@pytest.mark.parametrize(("out_features", "in_features"), [(1, 1), (17, 3), (40, 64), (96, 200), (5, 0)])
def test_products_agree_with_f_linear_for_every_shape(kernel: PanelKernel, rows: int, out_features: int,
                                                      in_features: int) -> None:
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(rows, in_features, generator=generator)
    got = kernel.product(x, kernel.pack(weight), out_features)
    torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["transposed rows", "float64 rows", "panels of another width", "too few panels"])
def test_mislaid_inputs_are_refused_before_the_kernel_reads_them(kernel: PanelKernel, case: str) -> None:
    weight, x = torch.randn(40, 8), torch.randn(3, 8)
    panels = kernel.pack(weight)
    out_features = 40
    if case == "transposed rows":
        x = torch.randn(8, 3).t()
    elif case == "float64 rows":
        x = x.double()
    elif case == "panels of another width":
        panels = panels[:, :, :-1].contiguous()
    else:
        out_features = 40 + 2 * kernel.width
    with pytest.raises(InternalFailure, match="not laid out as it reads them"):
        kernel.product(x, panels, out_features)


def test_auto_times_both_kernels_on_the_lm_head_and_says_which_it_keeps(
        tiny: ModelRuntime, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="services.decode.panel_products"):
        chosen = panel_products.choose(tiny.model, tiny.device, default_cache_dir(), "auto")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("batched products:"))
    assert "the panel kernel" in line and "oneDNN" in line and "ms" in line  # both timed, with figures
    assert line.startswith("batched products: the panel kernel (" if chosen else "batched products: oneDNN's (")


@pytest.mark.parametrize("head", ["half-precision", "not a linear layer"])
def test_a_model_whose_lm_head_cannot_be_packed_starts_on_its_own_products(tiny: ModelRuntime, head: str) -> None:
    """`auto` used to pack the LM head to time it, and a head that is not a float32 linear layer
    made the decode fail to start, where packing itself falls back to the model's own products."""
    model = copy.deepcopy(tiny.model)
    model.lm_head = model.lm_head.half() if head == "half-precision" else torch.nn.Identity()
    products = panel_products.choose(model, tiny.device, default_cache_dir(), "auto")
    assert PackedWeights.build(model, tiny.device, "batched", products) is None


def test_a_kernel_whose_products_differ_is_not_used(kernel: PanelKernel, tiny: ModelRuntime,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(PanelKernel, "product", lambda self, rows, panels, out: torch.zeros(rows.shape[0], out))
    with caplog.at_level(logging.INFO, logger="services.decode.panel_products"):
        assert panel_products.choose(tiny.model, tiny.device, default_cache_dir(), "auto") is None
    assert "its products differ from F.linear's" in caplog.text
    with pytest.raises(ValueError, match="native cannot be used here: its products differ"):
        panel_products.choose(tiny.model, tiny.device, default_cache_dir(), "native")


def test_bf16_weights_are_not_packed_and_auto_says_nothing_of_kernels(
        tiny: ModelRuntime, caplog: pytest.LogCaptureFixture) -> None:
    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="services.decode.panel_products"):
        assert panel_products.choose(model, tiny.device, default_cache_dir(), "auto") is None
    assert not caplog.records  # PackedWeights.build logs why nothing is packed


def test_onednn_mode_keeps_onednns_products_without_timing(tiny: ModelRuntime,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="services.decode.panel_products"):
        assert panel_products.choose(tiny.model, tiny.device, default_cache_dir(), "onednn") is None
    assert not caplog.records


@pytest.mark.parametrize(("mode", "refused"), [("native", True), ("auto", False)])
def test_without_a_compiler_native_refuses_to_start_and_auto_keeps_onednn(
        tiny: ModelRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        mode: str, refused: bool) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-here")
    if refused:
        with pytest.raises(ValueError, match="--batched-products native cannot be used here: no C compiler"):
            panel_products.choose(tiny.model, tiny.device, tmp_path, mode)
        return
    with caplog.at_level(logging.INFO, logger="services.decode.panel_products"):
        assert panel_products.choose(tiny.model, tiny.device, tmp_path, mode) is None
    assert "oneDNN's (the panel kernel cannot be used: no C compiler" in caplog.text


def test_bad_batched_products_settings_are_refused(tiny: ModelRuntime) -> None:
    with pytest.raises(ValueError, match="batched_products must be one of auto, native, onednn, got 'fast'"):
        DecodeSettings(batched_products="fast")
    with pytest.raises(ValueError, match="batched_products must be one of"):
        panel_products.choose(tiny.model, tiny.device, default_cache_dir(), "")


@pytest.mark.parametrize(("fields", "mode"), [({}, "auto"), ({"batched_products": "native"}, "native"),
                                              ({"batch_invariant": True}, "onednn"),
                                              ({"max_batch_size": 1}, "onednn")])
def test_the_decode_times_the_kernels_only_where_it_packs(fields: dict[str, object], mode: str) -> None:
    assert products_mode(DecodeSettings(**fields)) == mode  # type: ignore[arg-type]
