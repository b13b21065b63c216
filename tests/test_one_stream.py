"""The one-stream path (one_stream.py): a stream alone, stepped in the fewest calls, computes
Hugging Face's logits bit for bit over contiguous and scattered blocks, with biases and grouped
heads, its products on the exact gemv kernel or (where this machine's BLAS sums in another order
than the kernel's) on F.linear; where it cannot take a model it says why and the modules' path
runs; the running decode steps on it; its lean RMS norm gives the module's bits."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (DynamicCache, GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, PretrainedConfig, Qwen3Config, Qwen3ForCausalLM)
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from services.common.model_files import default_cache_dir
from services.common.packed_weights import PackedWeights
from services.common.runtime import ModelRuntime
from services.decode import exact_gemv, one_stream
from services.decode.__main__ import one_stream_refusal
from services.decode.blocks import BlockManager
from services.decode.exact_gemv import same_bits
from services.decode.one_stream import KvViews, OneStream, contiguous_kv
from services.decode.paged_runner import PagedRunner, StepSlot
from services.decode.pool import BlockPool, PoolConfig
from services.decode.settings import DecodeSettings
from tests.conftest import RunningStack, reference_model
from tests.gemv_helpers import needs_a_second_core, needs_the_blas_order


# the kernel alone, the kernel helped by a thread on the last core (gemv_helpers.py), or F.linear
PRODUCTS = [pytest.param("kernel", marks=needs_the_blas_order),
            pytest.param("kernel helped", marks=[needs_the_blas_order, needs_a_second_core]), "F.linear"]


def _path(model: torch.nn.Module, products: str) -> OneStream:
    if products.startswith("kernel"):
        helpers = [max(os.sched_getaffinity(0))] if products == "kernel helped" else []
        assert exact_gemv.install(model, default_cache_dir(), "native", helpers).layers > 0
    built = OneStream.build(model)
    assert isinstance(built, OneStream), built
    assert built.on_kernel == products.startswith("kernel")
    return built


def _spied(path: OneStream) -> list[int]:
    """A list that grows by one at each step the path takes."""
    steps: list[int] = []
    step = path.step

    def counting(token: int, position: int, kv: KvViews) -> torch.Tensor:
        steps.append(1)
        return step(token, position, kv)
    path.step = counting  # type: ignore[method-assign]
    return steps


@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("scattered", [False, True])
def test_a_stream_alone_on_the_one_stream_path_is_bit_identical_to_hugging_face(runtime: ModelRuntime, scattered: bool,
                                                                                 products: str) -> None:
    fast = reference_model("default")  # its own copy for the kernel: the session's reference stays untouched
    path = _path(fast.model, products)
    steps = _spied(path)
    config = PoolConfig(16, 4)
    pool, blocks = BlockPool(config, fast.geometry, fast.device), BlockManager(config)
    prompt = [1, 504, 3458, 282, 4649, 314, 2000, 17, 9]
    blocks.allocate("s", len(prompt) + 4)
    table = blocks.table("s")[::-1] if scattered else blocks.table("s")  # reversed: no two blocks adjacent
    cache = runtime.new_cache()
    fast.prefill(prompt, lambda layer, k, v: pool.write(table, layer, 0, k, v))
    runtime.prefill(prompt, lambda *_: None, cache)
    runner, token = PagedRunner(fast, pool, one_stream=path), 7
    with torch.inference_mode():
        for step in range(4):  # crosses a block boundary
            expected = runtime.model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1]
            assert same_bits(runner.step([StepSlot(table, len(prompt) + step, token)])[0], expected)
            token = int(expected.argmax())
    assert len(steps) == 4


def _biased_model() -> LlamaForCausalLM:
    """Random weights with biases on every projection (as Qwen2's q, k and v have) and grouped heads."""
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                         mlp_bias=True, tie_word_embeddings=False)
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_()  # initialized to zero: a bias added in the wrong place would not show
    return model


@pytest.mark.parametrize("products", PRODUCTS)
def test_biases_and_grouped_heads_give_hugging_faces_bits(products: str) -> None:
    reference = _biased_model()
    fast = _biased_model()
    path = _path(fast, products)
    contiguous = contiguous_kv()
    cache, token = DynamicCache(config=reference.config), 5
    with torch.inference_mode():
        for position in range(6):
            expected = reference(torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1]
            assert same_bits(path.step(token, position, contiguous)[0], expected)
            token = int(expected.argmax())


def _tiny(config_class: type[PretrainedConfig], model_class: type[torch.nn.Module], **extra: object) -> torch.nn.Module:
    config = config_class(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, **extra)
    torch.manual_seed(4)
    return model_class(config).eval()


def _a_layer_off() -> torch.nn.Module:
    """A Llama whose first layer's forward pass adds something the path does not know of."""
    model = _biased_model()
    layer = model.model.layers[0]
    forward = layer.forward
    layer.forward = lambda *args, **kwargs: forward(*args, **kwargs) * 2  # type: ignore[method-assign]
    return model


@pytest.mark.parametrize(("model", "reason"), [
    (lambda: _tiny(Qwen3Config, Qwen3ForCausalLM, head_dim=16),  # norms on the query and key heads
     "its layers (Qwen3DecoderLayer) are not ones whose forward pass it repeats"),
    (lambda: _tiny(GraniteConfig, GraniteForCausalLM, embedding_multiplier=2.0),  # scales what Llama does not
     "its layers (GraniteDecoderLayer) are not ones whose forward pass it repeats"),
    (lambda: _tiny(MistralConfig, MistralForCausalLM, head_dim=16, sliding_window=4),
     "a sliding window of 4 tokens (Hugging Face masks what lies before it)"),
    (_a_layer_off, "a probe step's logits differ from the model's own forward pass"),
])
def test_a_model_whose_forward_pass_the_path_does_not_repeat_is_refused(model: Callable[[], torch.nn.Module],
                                                                         reason: str) -> None:
    assert OneStream.build(model()) == reason


def test_a_model_or_settings_the_path_cannot_take_step_through_the_modules(tiny: ModelRuntime,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    headless = _biased_model()
    headless.lm_head = torch.nn.Identity()  # type: ignore[assignment]
    assert OneStream.build(headless) == "its LM head is not a float32 linear layer on the CPU"
    assert OneStream.build(_biased_model().to(torch.bfloat16)) == \
        "its LM head is not a float32 linear layer on the CPU"  # (its buffers are float32)
    half_layers = _biased_model()
    half_layers.model.layers.to(torch.float16)
    assert OneStream.build(half_layers) == "a layer's projections are not all float32 linear layers on the CPU"
    packed = PackedWeights.build(tiny.model, tiny.device, "all")
    assert packed is not None and packed.for_one
    assert one_stream_refusal(DecodeSettings(), packed) == \
        "a stream alone runs on the packed weights (--packed-weights all)"
    assert one_stream_refusal(DecodeSettings(one_stream=False), None) == "--no-one-stream"
    assert one_stream_refusal(DecodeSettings(), None) == ""
    with caplog.at_level("INFO", logger="services.decode.one_stream"):
        assert one_stream.for_model(_biased_model(), "--no-one-stream") is None
        assert one_stream.for_model(headless) is None
        assert one_stream.for_model(_biased_model()) is not None  # no kernel installed: products by F.linear
    assert "a stream alone steps through the model's modules (not the one-stream path: --no-one-stream)" \
        in caplog.text
    assert "(not the one-stream path: its LM head is not a float32 linear layer on the CPU)" in caplog.text
    assert "a stream alone steps on the one-stream path (products by F.linear, as the modules do" in caplog.text


def test_the_running_decode_steps_a_stream_alone_on_the_one_stream_path(memory_stack: RunningStack) -> None:
    """The stack the greedy exactness tests run against (tests/test_exactness.py) uses the path."""
    assert memory_stack.stack.log_dir is not None
    log = (Path(memory_stack.stack.log_dir) / "decode.log").read_text()
    assert "a stream alone steps on the one-stream path" in log


@pytest.mark.parametrize("norm_class", [LlamaRMSNorm, Qwen2RMSNorm])
def test_the_lean_rms_norm_gives_the_modules_bits(norm_class: type[torch.nn.Module]) -> None:
    generator = torch.Generator().manual_seed(7)
    module = norm_class(576, eps=1e-6)
    module.weight.data = torch.rand(576, generator=generator) * 3 - 1
    lean = one_stream._norm(module)
    assert lean is not module
    for scale in (1e-30, 1e-3, 1.0, 7.5, 1e15):  # x^2 summed over 576 stays finite
        x = torch.randn(1, 1, 576, generator=generator) * scale
        with torch.inference_mode():
            expected = module(x)
            assert bool(expected.abs().max() > 0)
            assert same_bits(lean(x), expected), scale


def test_a_norm_the_path_cannot_repeat_or_a_half_input_keeps_the_modules_forward() -> None:
    generator = torch.Generator().manual_seed(3)
    other = torch.nn.LayerNorm(8)
    assert one_stream._norm(other) is other
    hooked = LlamaRMSNorm(8)
    hooked.register_forward_hook(lambda *_: None)
    assert one_stream._norm(hooked) is hooked
    module = LlamaRMSNorm(8)
    module.weight.data = torch.rand(8, generator=generator) * 3 - 1
    x = (torch.randn(1, 1, 8, generator=generator) * 3).to(torch.bfloat16)
    with torch.inference_mode():
        got, expected = one_stream._norm(module)(x), module(x)
    assert got.dtype == expected.dtype == torch.float32 and same_bits(got, expected)


def test_a_path_built_in_inference_mode_steps_outside_it(tiny: ModelRuntime) -> None:
    with torch.inference_mode():
        built_inside = OneStream.build(tiny.model)
    built_outside = OneStream.build(tiny.model)
    assert isinstance(built_inside, OneStream) and isinstance(built_outside, OneStream)
    with torch.no_grad():  # in place into buffers made in inference mode: refused by torch
        assert same_bits(built_inside.step(1, 0, contiguous_kv()), built_outside.step(1, 0, contiguous_kv()))
