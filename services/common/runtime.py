"""The model runtime both workers use: load a checkpoint and run a prompt forward pass that hands
out each layer's KV as soon as the layer is done (decode steps run over the paged pool, in
services/decode/paged_runner.py).

Every method here is synchronous and meant for one model thread; the services call it through
an executor so the asyncio loop never blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache  # noqa: E402

from services.common.context_length import served_length  # noqa: E402
from services.common.grammar import GrammarEngine  # noqa: E402
from services.common.logprobs import TokenLogprob  # noqa: E402
from services.common.scoring import prompt_logprobs  # noqa: E402
from services.common.model_files import resolve_model_dir, weights_digest  # noqa: E402

if TYPE_CHECKING:
    from transformers.cache_utils import DynamicLayer

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                   "float16": torch.float16}

# Called from the model thread with (layer index, keys, values); tensors are [kv_heads, tokens, head_dim].
LayerKvCallback = Callable[[int, torch.Tensor, torch.Tensor], object]  # what it returns is ignored


@dataclass(frozen=True, slots=True)
class ModelGeometry:
    """What a KV cache of this model looks like, and the model's identity."""

    name: str
    fingerprint: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    vocab_size: int

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPES[self.dtype].itemsize


def read_geometry(model_dir: Path, name: str, dtype: str) -> ModelGeometry:
    """Geometry and fingerprint from the checkpoint's config and weights, without loading it."""
    config = AutoConfig.from_pretrained(model_dir)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    eos = config.eos_token_id
    eos_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
    identity = {"architectures": config.architectures, "model_type": config.model_type,
                "weights_sha256": weights_digest(model_dir), "dtype": dtype,
                "kv_layout": [config.num_hidden_layers, kv_heads, head_dim]}
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return ModelGeometry(name=name, fingerprint=fingerprint, dtype=dtype,
                         num_layers=config.num_hidden_layers, num_kv_heads=kv_heads,
                         head_dim=head_dim, max_model_len=served_length(config),
                         eos_token_ids=eos_ids, vocab_size=config.vocab_size)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cached_kv(cache: DynamicCache, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `index`'s keys and values in `cache`, once the layer has run: a DynamicCache of these
    (full-attention) models holds a DynamicLayer per layer, whose tensors are set by then."""
    layer = cast("DynamicLayer", cache.layers[index])
    return cast(torch.Tensor, layer.keys), cast(torch.Tensor, layer.values)


class ModelRuntime:
    """One loaded causal LM."""

    def __init__(self, model: str, dtype: str, device: str, cache_dir: Path) -> None:
        model_dir = resolve_model_dir(model, cache_dir)
        self.model_dir = model_dir
        self.geometry = read_geometry(model_dir, model, dtype)
        self.device = resolve_device(device)
        log.info("loading %s (%s) on %s", model_dir, dtype, self.device)
        loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
        # transformers wraps PreTrainedModel.to with functools.wraps, whose type loses the bound self
        self._model = loaded.to(self.device)  # type: ignore[arg-type]
        self._model.eval()
        self._layers = self._model.model.layers
        self.grammars = GrammarEngine(model_dir, self.geometry.vocab_size, self.geometry.eos_token_ids)

    @property
    def model(self) -> torch.nn.Module:
        """The Hugging Face model (for engines that run its layers themselves)."""
        return self._model

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self._model.config)

    @torch.inference_mode()
    def prefill(self, token_ids: list[int], on_layer: LayerKvCallback, cache: DynamicCache | None = None
                ) -> torch.Tensor:
        """Forward the prompt (or, with `cache`, its next chunk); call `on_layer` with each layer's
        KV of these tokens as soon as the layer is done. Returns the last position's logits
        (float32, on CPU)."""
        return self.prefill_scored(token_ids, on_layer, [], None, cache)[0]

    @torch.inference_mode()
    def prefill_scored(self, token_ids: list[int], on_layer: LayerKvCallback, next_ids: list[int],
                       top_n: int | None, cache: DynamicCache | None = None) -> tuple[torch.Tensor, list[TokenLogprob]]:
        """`prefill`, and, unless `top_n` is None, the log-probability of `next_ids[i]` at position i
        (the prompt's own next tokens: one fewer than `token_ids` for a whole prompt, as many for a
        chunk of a longer one) with the `top_n` most likely tokens there."""
        hidden = self._hidden(token_ids, on_layer, cache)
        last = self._model.lm_head(hidden[-1:])[0].float().cpu()  # as HF's logits_to_keep=1 computes it
        return last, [] if top_n is None else prompt_logprobs(hidden, self._model.lm_head, next_ids, top_n)

    def _hidden(self, token_ids: list[int], on_layer: LayerKvCallback, cache: DynamicCache | None) -> torch.Tensor:
        """The final hidden states [tokens, hidden] of a forward pass, the layers' KV handed out."""
        cache = cache if cache is not None else self.new_cache()
        start = cache.get_seq_length()
        hooks = [layer.register_forward_hook(self._layer_hook(index, cache, start, on_layer))
                 for index, layer in enumerate(self._layers)]
        try:
            ids = torch.tensor([token_ids], device=self.device)
            return self._model.model(input_ids=ids, cache=cache, use_cache=True).last_hidden_state[0]
        finally:
            for hook in hooks:
                hook.remove()

    @torch.inference_mode()
    def prefill_batch(self, prompts: list[list[int]], on_layer: list[LayerKvCallback]) -> list[torch.Tensor]:
        """Forward several prompts in one right-padded batch; `on_layer[i]` gets prompt i's KV of each
        layer. Returns each prompt's last logits. (Padding changes matmul shapes, so the results may
        differ in the last bits from one prompt alone.)"""
        lengths = torch.tensor([len(prompt) for prompt in prompts])
        ids = torch.zeros((len(prompts), int(lengths.max())), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        cache = self.new_cache()

        def hook(index: int) -> Callable[..., None]:
            def deliver(*_: object) -> None:
                keys, values = _cached_kv(cache, index)
                for row, callback in enumerate(on_layer):
                    callback(index, keys[row, :, : lengths[row]], values[row, :, : lengths[row]])
            return deliver

        hooks = [layer.register_forward_hook(hook(index)) for index, layer in enumerate(self._layers)]
        try:
            hidden = self._model.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                       cache=cache, use_cache=True).last_hidden_state
        finally:
            for handle in hooks:
                handle.remove()
        last = hidden[torch.arange(len(prompts)), lengths.to(self.device) - 1]
        return list(self._model.lm_head(last).float().cpu())

    @staticmethod
    def _layer_hook(index: int, cache: DynamicCache, start: int, on_layer: LayerKvCallback) -> Callable[..., None]:
        def hook(*_: object) -> None:
            keys, values = _cached_kv(cache, index)
            on_layer(index, keys[0, :, start:], values[0, :, start:])
        return hook

    @torch.inference_mode()
    def reference_generate(self, token_ids: list[int], max_new_tokens: int, **options: Any) -> list[int]:
        """Hugging Face `generate`, greedy: the ground truth the services must equal. `options` go to
        `generate` as they are (logits processors, repetition_penalty, ...)."""
        ids = torch.tensor([token_ids], device=self.device)
        out = self._model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, **options)
        return out[0, len(token_ids):].tolist()
