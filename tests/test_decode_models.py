"""The models the decode computes: its steps run Llama-family layers themselves (paged_runner.py),
so a model with other layers is refused at start with the reason instead of being served wrong
logits; a sliding window shorter than the model's context caps the length it serves (the steps
attend over every token, which is the window's attention only while the context fits in it)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from transformers import GraniteConfig, GraniteForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

from services.common.model_files import default_cache_dir, resolve_model_dir
from services.common.runtime import ModelRuntime, read_geometry
from services.gateway.text import PromptEncoder
from services.decode.paged_runner import PagedRunner
from services.decode.pool import BlockPool, PoolConfig


def test_a_model_whose_layers_the_decode_does_not_compute_is_refused_at_start(tiny: ModelRuntime) -> None:
    """Granite scales embeddings, residuals and logits where Llama does not: stepped as a Llama its
    logits were wrong from the first token."""
    config = GraniteConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, embedding_multiplier=2.0)
    granite = SimpleNamespace(model=GraniteForCausalLM(config).eval(), device=torch.device("cpu"))
    pool = BlockPool(PoolConfig(4, 4), tiny.geometry, tiny.device)
    with pytest.raises(ValueError, match=r"the decode computes the layers of Llama, Mistral and Qwen2 models "
                                         r"\(LlamaDecoderLayer, MistralDecoderLayer, Qwen2DecoderLayer\), "
                                         r"not GraniteDecoderLayer"):
        PagedRunner(granite, pool)  # type: ignore[arg-type]
    PagedRunner(tiny, pool)  # a Llama is


@pytest.mark.parametrize(("config", "length"), [
    (MistralConfig(sliding_window=4096, max_position_embeddings=32768), 4096),
    (MistralConfig(sliding_window=None, max_position_embeddings=32768), 32768),
    (MistralConfig(sliding_window=32768, max_position_embeddings=32768), 32768),
    (Qwen2Config(sliding_window=4096, use_sliding_window=False, max_position_embeddings=32768), 32768),
    (Qwen2Config(sliding_window=1024, use_sliding_window=True, max_window_layers=2, num_hidden_layers=4,
                 max_position_embeddings=32768), 1024),
    # Qwen2 slides only from max_window_layers on: with all layers below it, none does
    (Qwen2Config(sliding_window=1024, use_sliding_window=True, max_window_layers=4, num_hidden_layers=4,
                 max_position_embeddings=32768), 32768),
    (LlamaConfig(sliding_window=128, max_position_embeddings=2048), 2048),  # type: ignore[call-arg]  # never read
])
def test_a_sliding_window_shorter_than_the_context_caps_the_length_the_gateway_and_workers_serve(
        tmp_path: Path, config: PretrainedConfig, length: int) -> None:
    config.save_pretrained(tmp_path)
    save_file({"weight": torch.zeros(1)}, tmp_path / "model.safetensors")  # the fingerprint reads the weights
    tokenizer = resolve_model_dir("tiny", default_cache_dir())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, tmp_path / name)
    assert read_geometry(tmp_path, "windowed", "float32").max_model_len == length  # the workers' admission
    assert PromptEncoder(tmp_path).max_model_len == length  # the gateway's length check and /v1/models
