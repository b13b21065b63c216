"""Packed weights for the decode step (--packed-weights), laid out for oneDNN or for the panel
kernel (--batched-products): batched steps run on them and agree with the model's own products
within rounding; a batch of one keeps Hugging Face's bit-identical products unless `all` is asked
for; fused projections keep their biases; bad settings are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from services.common.runtime import ModelRuntime
from services.decode.blocks import BlockManager
from services.common.model_files import default_cache_dir
from services.common.packed_weights import (PackedLinear, PackedLinearModule, PackedWeights, RowProducts,
                                            packing_unsupported)
from services.common.worker import WorkerSettings, load_runtime
from services.decode.paged_runner import PagedRunner, StepSlot
from services.decode.panel_products import PanelKernel
from services.decode.pool import BlockPool, PoolConfig
from services.decode.__main__ import packing_mode
from services.decode.settings import DecodeSettings

pytestmark = pytest.mark.skipif(packing_unsupported(torch.device("cpu"), torch.float32) is not None,
                                reason="no oneDNN weight packing in this torch build")


def _packed(model: ModelRuntime, mode: str = "batched", products: RowProducts | None = None) -> PackedWeights:
    packed = PackedWeights.build(model.model, model.device, mode, products)
    assert packed is not None and packed.products is products
    return packed


@pytest.fixture(params=["onednn", "panel kernel"])
def products(request: pytest.FixtureRequest) -> RowProducts | None:
    """Each layout the decode can pack its weights for (--batched-products)."""
    if request.param == "onednn":
        return None
    built = PanelKernel.build(default_cache_dir())
    if isinstance(built, str):
        pytest.skip(f"the panel kernel cannot be built here: {built}")
    return built


def _filled_pool(model: ModelRuntime, lengths: tuple[int, ...]) -> tuple[BlockPool, list[StepSlot]]:
    config = PoolConfig(64, 4)
    pool, blocks = BlockPool(config, model.geometry, model.device), BlockManager(config)
    slots = []
    for index, length in enumerate(lengths):
        blocks.allocate(f"s{index}", length + 1)
        table = blocks.table(f"s{index}")
        prompt = list(range(20 + index, 20 + index + length))
        model.prefill(prompt, lambda layer, k, v, table=table: pool.write(table, layer, 0, k, v))
        slots.append(StepSlot(table, length, 60 + index))
    return pool, slots


def test_batched_steps_run_on_packed_weights_and_agree_with_the_models_products(
        tiny: ModelRuntime, products: RowProducts | None) -> None:
    pool, slots = _filled_pool(tiny, (3, 9, 6))
    saved = [(k.clone(), v.clone()) for k, v in zip(pool.keys, pool.values)]

    def step(runner: PagedRunner) -> torch.Tensor:
        for (keys, values), (k, v) in zip(saved, zip(pool.keys, pool.values)):
            k.copy_(keys)
            v.copy_(values)
        return runner.step(slots)

    packed, plain = PagedRunner(tiny, pool, packed=_packed(tiny, products=products)), PagedRunner(tiny, pool)
    assert packed.packs(3) and not packed.packs(1) and not plain.packs(3)
    expected = step(plain)
    got = step(packed)
    assert not torch.equal(got, expected)  # other kernels round differently: the packed path really ran
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("mode", ["batched", "all"])
def test_a_batch_of_one_is_bit_identical_to_hf_unless_all_is_asked_for(tiny: ModelRuntime, mode: str,
                                                                       products: RowProducts | None) -> None:
    config = PoolConfig(16, 4)
    pool, blocks = BlockPool(config, tiny.geometry, tiny.device), BlockManager(config)
    prompt = [5, 17, 33, 2, 90, 41]
    blocks.allocate("s", len(prompt) + 1)
    table = blocks.table("s")
    cache = tiny.new_cache()
    tiny.prefill(prompt, lambda layer, k, v: pool.write(table, layer, 0, k, v), cache)
    runner = PagedRunner(tiny, pool, packed=_packed(tiny, mode, products))
    with torch.inference_mode():
        expected = tiny.model(input_ids=torch.tensor([[7]]), cache=cache, use_cache=True).logits[0, -1]
    got = runner.step([StepSlot(table, len(prompt), 7)])[0]
    assert runner.packs(1) is (mode == "all")
    if mode == "batched":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_fused_projections_keep_each_parts_bias(products: RowProducts | None) -> None:
    torch.manual_seed(0)
    with_bias, without = torch.nn.Linear(16, 8), torch.nn.Linear(16, 20, bias=False)
    x = torch.randn(3, 5, 16)  # leading dimensions are kept
    first, second = PackedLinear.of(with_bias, without, products=products)(x)
    with torch.no_grad():
        torch.testing.assert_close(first, with_bias(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(second, without(x), rtol=1e-5, atol=1e-5)


def test_a_prefill_with_all_computes_its_forward_passes_on_packed_linears(tiny: ModelRuntime) -> None:
    """The prefill worker's model with --packed-weights all: every linear layer packed, the prompt's
    logits within rounding of Hugging Face's (and not bit-identical: the packed kernels ran)."""
    threads = torch.get_num_threads()  # load_runtime applies the worker's CPU placement to this process
    settings = WorkerSettings(model="tiny", packed_weights="all")
    packed = load_runtime(settings, pack_linears_too=True)
    layers = packed.model.model.layers
    assert isinstance(packed.model.lm_head, PackedLinearModule)
    assert all(isinstance(getattr(layer.mlp, name), PackedLinearModule) for layer in layers
               for name in ("gate_proj", "up_proj", "down_proj"))
    prompt = [3, 14, 15, 92, 65, 35, 89, 79]
    got, expected = packed.prefill(prompt, lambda *_: None), tiny.prefill(prompt, lambda *_: None)
    assert not torch.equal(got, expected)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert load_runtime(WorkerSettings(model="tiny")).prefill(prompt, lambda *_: None).equal(expected)
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("fields", "phrase"), [({"packed_weights": "fast"}, "packed_weights must be one of"),
                                                ({"packed_weights": "all", "batch_invariant": True},
                                                 "batch_invariant needs a batch of one's own products")])
def test_bad_packed_weights_settings_are_refused(fields: dict[str, object], phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        DecodeSettings(**fields)  # type: ignore[arg-type]


def test_a_batch_invariant_runner_packs_nothing(tiny: ModelRuntime) -> None:
    pool, _ = _filled_pool(tiny, (3,))
    assert not PagedRunner(tiny, pool, batch_invariant=True, packed=_packed(tiny)).packs(8)
    with pytest.raises(ValueError, match="not all"):
        PagedRunner(tiny, pool, batch_invariant=True, packed=_packed(tiny, "all"))


def test_half_precision_weights_are_not_packed(caplog: pytest.LogCaptureFixture) -> None:
    """Only float32 was measured: a bfloat16 model keeps F.linear, and says so."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).to(torch.bfloat16)
    assert PackedWeights.build(model, torch.device("cpu"), "batched") is None
    assert "packing is for float32 weights" in caplog.text


def test_a_model_whose_layers_are_not_plain_linears_keeps_its_own_products(tiny: ModelRuntime,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A mixture-of-experts MLP (no gate/up/down linears) or a quantized layer: the decode logs it
    and steps with the model's own modules instead of failing to start."""
    model = copy.deepcopy(tiny.model)
    model.model.layers[0].mlp = torch.nn.Identity()
    assert PackedWeights.build(model, tiny.device, "batched") is None
    assert "not plain Llama-style linears" in caplog.text


@pytest.mark.parametrize(("fields", "mode"), [({}, "batched"), ({"max_batch_size": 1}, "off"),
                                              ({"max_batch_size": 1, "packed_weights": "all"}, "all"),
                                              ({"batch_invariant": True}, "off")])
def test_the_decode_packs_only_what_its_steps_can_use(fields: dict[str, object], mode: str) -> None:
    assert packing_mode(DecodeSettings(**fields)) == mode  # type: ignore[arg-type]
