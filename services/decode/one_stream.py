"""A stream decoding alone, in the fewest calls a step (runs on the model thread; paged_runner.py).

A batch of one must compute what the model's own forward pass computes, bit for bit. PagedRunner's
general path does so through the model's modules; this path does the same operations on the same
values in fewer calls, so it computes the same bits:
- q, k and v land in one buffer from three products, gate and up in another, with no module
  dispatch: the exact gemv kernel's (exact_gemv.py) where it is installed, writing in place;
  otherwise `F.linear`'s on the module's own weight, as the module calls it, copied there;
- the query and key heads are rotated together, in four elementwise operations where the model
  runs eight (an elementwise result does not depend on which tensor its operands sit in);
- attention calls torch's SDPA as Hugging Face's SDPA attention would (no mask, `enable_gqa` for
  grouped heads), without that wrapper's checks, reshapes and copy;
- an RMS norm of Llama's kind runs its operations in their order without the module's call and
  its float32 casts (no-ops on float32), in place where a result is its own (~25 of ~48 us);
- the products' buffers are allocated once per path and split once, not per layer (a path steps
  one stream at a time, on the model thread).
Measured at 448 tokens of context on the development machine: 35.4 ms a step against 39.7 on the
general path, of which the products take ~27 and attention ~5. The lean norms and the buffers allocated
once took a step at 500 tokens of context from 43.5-45.0 ms to 41.3-41.4 on a 2-core Zen 3 (one
thread, alternating runs).

On a machine whose BLAS sums a row in another order than the kernel (an Intel Xeon, where MKL's
row products already read the weights at the core's speed) the products stay F.linear's and the
path still saves the rest: 64.5 ms a step against 69.5 there.

It runs where every projection and the LM head is an `nn.Linear` or its `ExactGemvLinear` (the
kernel installed, `--gemv` auto or native) of a layer whose forward pass it repeats (Llama's,
Mistral's and Qwen2's decoder layers, SmolLM being a Llama; no sliding window shorter than the
model's context), where
Hugging Face's SDPA attention would take the `enable_gqa` path, and where two probe steps give the
model's own logits bit for bit. `OneStream.build` says why not otherwise, and the general path
runs. It holds the modules it was built from: a model changed after that needs another build.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaRMSNorm, rotate_half
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from services.common.context_length import attention_window
from services.decode.exact_gemv import ExactGemvLinear, same_bits

# (layer, new key [kv_heads, head_dim], its value) -> that layer's keys and values [1, kv_heads, length, head_dim],
# the new token's included: stores the token's KV and views (or gathers) the sequence's. The key and value are
# valid during the call only (the value lies in a buffer the next layer writes): store copies.
KvViews = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

log = logging.getLogger(__name__)

SDPA_GQA_HEAD_DIM = 256  # Hugging Face's SDPA attention passes enable_gqa up to this head size (use_gqa_in_sdpa)
# the decoder layers whose forward pass `step` (and PagedRunner's general path) repeats
LAYER_CLASSES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
# weight * (x * rsqrt(mean(x^2) + eps)), each with this forward (the same code in each)
NORM_FORWARDS = {kind: kind.forward for kind in (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm)}
PROBE_TOKENS = (1, 2)  # fed at positions 0 and 1 by `build`'s check against the model's forward pass


def other_layers(model: torch.nn.Module) -> list[str]:
    """The classes of `model`'s decoder layers that are not in LAYER_CLASSES (['none'] without any)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    found = {type(layer).__name__ for layer in layers} if isinstance(layers, torch.nn.ModuleList) else {"none"}
    return sorted(found - set(LAYER_CLASSES))


def contiguous_kv() -> KvViews:
    """KV views over per-layer caches of their own, grown by concatenation (probe steps, tests)."""
    keys: dict[int, list[torch.Tensor]] = {}
    values: dict[int, list[torch.Tensor]] = {}

    def store_and_view(layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys.setdefault(layer, []).append(key[None, :, None].clone())  # the path reuses its buffers
        values.setdefault(layer, []).append(value[None, :, None].clone())
        return torch.cat(keys[layer], dim=2), torch.cat(values[layer], dim=2)
    return store_and_view


@dataclass(frozen=True, slots=True)
class _Projection:
    """A linear layer's product for one row, written into a buffer: the exact gemv kernel's where it
    is installed, else `F.linear`'s (the call the module makes) copied there."""

    into: Callable[[torch.Tensor, torch.Tensor], None]
    in_features: int
    out_features: int
    on_kernel: bool


def _projection(module: torch.nn.Module | None) -> _Projection | None:
    if isinstance(module, ExactGemvLinear):
        return _Projection(module.into, module.in_features, module.out_features, True)
    if type(module) is not torch.nn.Linear:  # (a subclass may compute otherwise)
        return None
    linear = module
    if linear.weight.dtype != torch.float32 or not linear.weight.is_cpu:  # what `step`'s buffers hold
        return None

    def into(x: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(F.linear(x.reshape(1, -1), linear.weight, linear.bias).view(-1))
    return _Projection(into, linear.in_features, linear.out_features, False)


Norm = Callable[[torch.Tensor], torch.Tensor]


def _norm(module: torch.nn.Module) -> Norm:
    """The module's forward in fewer calls where it is one of NORM_FORWARDS' in float32 (the same
    operations in the same order: the same bits), else the module itself (also where hooks or a
    forward of its own, such as a hub kernel's, would run instead)."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    kind = type(module)
    plain = kind in NORM_FORWARDS and kind.forward is NORM_FORWARDS[kind] and "forward" not in vars(module) \
        and not module._forward_hooks and not module._forward_pre_hooks
    if not plain or type(weight) not in (torch.Tensor, torch.nn.Parameter) or not isinstance(eps, float) \
            or not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32:
        return module

    def norm(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:  # the module's casts would round
            return module(x)
        scale = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        return torch.mul(x, scale).mul_(weight)  # weight * (x * scale): a product does not depend on its order
    return norm


@dataclass(frozen=True, slots=True)
class _Layer:
    input_norm: Norm
    qkv: tuple[_Projection, _Projection, _Projection]
    o: _Projection
    post_norm: Norm
    gate: _Projection
    up: _Projection
    down: _Projection
    act: torch.nn.Module
    scaling: float

    @property
    def projections(self) -> tuple[_Projection, ...]:
        return (*self.qkv, self.o, self.gate, self.up, self.down)


@dataclass(frozen=True, slots=True)
class _Shape:
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        return self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim


@dataclass(frozen=True, slots=True)
class _Ends:
    """What runs before and after the layers."""

    embed: torch.nn.Module
    rotary: torch.nn.Module
    norm: Norm
    lm_head: _Projection


class _Buffers:
    """Where a step's products land, allocated and split once: the layers take turns in them."""

    def __init__(self, shape: _Shape) -> None:
        with torch.inference_mode(False):  # written in place later, in or out of inference mode
            sizes = shape.qkv_sizes
            whole = torch.empty(sum(sizes), dtype=torch.float32)
            self.qkv = whole.split(sizes)
            query_key, value = whole.split((sizes[0] + sizes[1], sizes[2]))
            self.query_key = query_key.view(-1, shape.head_dim)
            self.value = value.view(shape.kv_heads, shape.head_dim)
            self.attended = torch.empty(shape.hidden, dtype=torch.float32)
            self.gate, self.up = torch.empty(2 * shape.intermediate, dtype=torch.float32).split(shape.intermediate)
            self.mlp = torch.empty(shape.hidden, dtype=torch.float32)


class OneStream:
    def __init__(self, ends: _Ends, layers: list[_Layer], shape: _Shape) -> None:
        self._ends = ends
        self._layers = layers
        self._shape = shape
        self._buffers = _Buffers(shape)

    @staticmethod
    def build(model: torch.nn.Module) -> OneStream | str:
        """The path for `model` (a causal LM on the CPU in float32, its linear layers replaced by
        exact_gemv.install or not), or why it cannot take it."""
        body, lm_head = getattr(model, "model", None), _projection(_module(model, "lm_head"))
        layers = getattr(body, "layers", None)
        if lm_head is None or not isinstance(layers, torch.nn.ModuleList) or not layers:
            return "its LM head is not a float32 linear layer on the CPU"
        other = other_layers(model)
        if other:
            return f"its layers ({', '.join(other)}) are not ones whose forward pass it repeats"
        window = attention_window(getattr(model, "config", None))
        if window:
            return f"a sliding window of {window} tokens (Hugging Face masks what lies before it)"
        ends = [_module(body, name) for name in ("embed_tokens", "rotary_emb", "norm")]
        built = [_layer(layer) for layer in layers]
        ready = [layer for layer in built if isinstance(layer, _Layer)]
        if len(ready) < len(built) or None in ends:
            return next((reason for reason in built if isinstance(reason, str)), "the model is not a Llama-family one")
        embed, rotary, norm = (end for end in ends if end is not None)
        shape = _shape(ready, getattr(layers[0].self_attn, "head_dim", None), lm_head.out_features)
        if isinstance(shape, str):
            return shape
        path = OneStream(_Ends(embed, rotary, _norm(norm), lm_head), ready, shape)
        return path if _agrees(path, model) else "a probe step's logits differ from the model's own forward pass"

    @property
    def on_kernel(self) -> bool:
        """Whether every product runs on the exact gemv kernel (else some on `F.linear`)."""
        return self._ends.lm_head.on_kernel and all(p.on_kernel for layer in self._layers for p in layer.projections)

    def step(self, token: int, position: int, kv: KvViews) -> torch.Tensor:
        """Logits [1, vocab] of the token after `token` (at `position`)."""
        ends = self._ends
        hidden = ends.embed(torch.tensor([[token]]))
        cos, sin = ends.rotary(hidden, torch.tensor([[position]]))
        cos, sin = cos.view(1, -1), sin.view(1, -1)  # one position's: broadcast over the heads
        for index, layer in enumerate(self._layers):
            hidden = hidden + self._attention(index, layer, layer.input_norm(hidden), cos, sin, kv)
            hidden = hidden + self._mlp(layer, layer.post_norm(hidden))
        logits = torch.empty(1, self._shape.vocab)
        ends.lm_head.into(ends.norm(hidden), logits[0])
        return logits

    def _attention(self, index: int, layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   kv: KvViews) -> torch.Tensor:
        shape, buffers = self._shape, self._buffers
        for projection, part in zip(layer.qkv, buffers.qkv):
            projection.into(x, part)
        query_key = buffers.query_key
        query_key = (query_key * cos) + (rotate_half(query_key) * sin)  # apply_rotary_pos_emb's operations
        query, key = query_key.split((shape.heads, shape.kv_heads))
        keys, values = kv(index, key, buffers.value)
        attended = F.scaled_dot_product_attention(query.view(1, shape.heads, 1, shape.head_dim), keys, values,
                                                  scale=layer.scaling, enable_gqa=shape.heads != shape.kv_heads)
        layer.o.into(attended, buffers.attended)  # [1, heads, 1, head_dim] lies in memory as [1, 1, heads * head_dim]
        return buffers.attended

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers
        layer.gate.into(x, buffers.gate)
        layer.up.into(x, buffers.up)
        layer.down.into(layer.act(buffers.gate) * buffers.up, buffers.mlp)
        return buffers.mlp


def for_model(model: torch.nn.Module, refused: str = "") -> OneStream | None:
    """The path a decode worker steps a stream alone on (None: the model's modules), logged;
    `refused`: why the worker's settings leave it out ('' where they do not). Runs the model (its
    probe steps): call it on the model thread."""
    built = OneStream.build(model) if not refused else refused
    if isinstance(built, str):
        log.info("a stream alone steps through the model's modules (not the one-stream path: %s)", built)
        return None
    log.info("a stream alone steps on the one-stream path (products %s, SDPA called directly)",
             "on the exact gemv kernel into shared buffers" if built.on_kernel else "by F.linear, as the modules do")
    return built


def _shape(layers: list[_Layer], head_dim: object, vocab: int) -> _Shape | str:
    """The sizes every layer shares, or why there are none."""
    if not isinstance(head_dim, int) or head_dim <= 0:
        return "its attention has no head size"
    first = layers[0]
    shape = _Shape(first.qkv[0].out_features // head_dim, first.qkv[1].out_features // head_dim, head_dim,
                   first.o.out_features, first.gate.out_features, vocab)
    sizes = {(tuple(p.out_features for p in layer.projections), tuple(p.in_features for p in layer.projections))
             for layer in layers}
    if len(sizes) > 1 or first.qkv[0].out_features != shape.heads * head_dim \
            or first.qkv[1].out_features != shape.kv_heads * head_dim:
        return "its layers differ in size, or their heads do not divide their projections"
    if head_dim > SDPA_GQA_HEAD_DIM and shape.heads != shape.kv_heads:
        return f"heads of {head_dim} values: Hugging Face's SDPA attention packs grouped queries for those"
    return shape


def _agrees(path: OneStream, model: torch.nn.Module) -> bool:
    """Whether the path's logits equal the model's own forward pass bit for bit on two probe steps
    (as integers: -0.0 is not 0.0)."""
    views = contiguous_kv()
    cache = DynamicCache(config=getattr(model, "config", None))
    with torch.inference_mode():
        for position, token in enumerate(PROBE_TOKENS):
            token %= path._shape.vocab
            expected = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1]
            if not same_bits(path.step(token, position, views)[0], expected):
                return False
    return True


def _module(parent: object, name: str) -> torch.nn.Module | None:
    found = getattr(parent, name, None)
    return found if isinstance(found, torch.nn.Module) else None


def _layer(layer: torch.nn.Module) -> _Layer | str:
    attention, mlp = _module(layer, "self_attn"), _module(layer, "mlp")
    found = [_projection(_module(attention, name)) for name in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
        [_projection(_module(mlp, name)) for name in ("gate_proj", "up_proj", "down_proj")]
    projections = [projection for projection in found if projection is not None]
    if len(projections) < len(found):
        return "a layer's projections are not all float32 linear layers on the CPU"
    if hasattr(attention, "q_norm") or hasattr(attention, "k_norm"):
        return "the layers norm their query and key heads"
    norms_and_act = [_module(layer, "input_layernorm"), _module(layer, "post_attention_layernorm"),
                     _module(mlp, "act_fn")]
    scaling = getattr(attention, "scaling", None)
    if None in norms_and_act or not isinstance(scaling, float):
        return "the layers are not Llama-family ones"
    input_norm, post_norm, act = (module for module in norms_and_act if module is not None)
    q, k, v, o, gate, up, down = projections
    return _Layer(_norm(input_norm), (q, k, v), o, _norm(post_norm), gate, up, down, act, scaling)
