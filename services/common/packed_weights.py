"""oneDNN-packed copies of the model's projection weights, for the decode step's matrix products
(and, with `--packed-weights all`, the prefill's forward passes).

`F.linear` on a float32 CPU tensor calls MKL's GEMM, which is slow for the few rows a decode step
has: measured on the 2-core development machine (one thread), a [32, 576] x [576, 1536] product took
0.60 ms through `F.linear` and 0.26 ms through oneDNN with the weight reordered once into its blocked
layout (`torch.ops.mkldnn._reorder_linear_weight`, the same kernels vLLM's CPU backend calls); the
49,152-row LM head 26.8 against 10.1 ms at 32 rows and 7.2 against 3.8 ms at one row. A whole step of
SmolLM2-135M: 172 -> 97 ms at 32 sequences, 77 -> 40 ms at 8, 40 -> 26 ms at one.

The packed products round differently from MKL's (last bits), so a batch of one, whose logits are
bit-identical to Hugging Face's forward pass, keeps the model's own `F.linear` by default
(`--packed-weights batched`); `all` packs a batch of one too (faster, no longer bit-identical), `off`
keeps no packed copy. The decode's copy costs about the projection weights' size again (q/k/v and
gate/up are each packed as one fused matrix; the LM head of a model with tied embeddings is a second
copy). On the prefill worker only `all` does anything: it replaces every linear layer of its model by
a packed one (`pack_linears`: no second copy but the tied LM head's), so the prompt's KV and first
token are no longer bit-identical to Hugging Face's either; the default keeps them so.

The decode may lay its copy out for another kernel instead (`RowProducts`: the panel kernel of
services/decode/panel_products.py, `--batched-products`); a copy is laid out for one of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch

log = logging.getLogger(__name__)

PACKED_MODES = ("batched", "all", "off")
ROWS_HINT = 32  # the batch size oneDNN picks its blocking for (the products stay correct for any rows)


class RowProducts(Protocol):
    """A kernel with its own weight layout: a few rows times a weight, for decode steps."""

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` [out, in] in the kernel's layout."""

    def product(self, rows: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
        """`rows` [m, in] (contiguous float32) times the weight `pack` gave `packed` for: [m, out]."""


def packing_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why weights of this dtype on this device are not packed, or None when they are: CPU float32
    only (what was measured; half precision on CPUs without it has slow paths of its own)."""
    if device.type != "cpu":
        return f"packing is for the CPU, the model is on {device}"
    if dtype != torch.float32:
        return f"packing is for float32 weights, the model's are {dtype}"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return "this torch build has no oneDNN weight packing"
    return None


def _unsupported(model: torch.nn.Module, device: torch.device, mode: str) -> bool:
    reason = packing_unsupported(device, next(model.parameters()).dtype)
    if reason is not None:  # on a GPU this is expected (no warning); on a CPU it costs the speed-up
        log.log(logging.INFO if device.type != "cpu" else logging.WARNING, "--packed-weights %s: %s; using the "
                "model's own products", mode, reason)
    return reason is not None


@dataclass(frozen=True, slots=True)
class PackedLinear:
    """One (possibly fused) projection: its packed weight, bias, and the widths of its parts."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    widths: tuple[int, ...]
    products: RowProducts | None = None  # the kernel `weight` is laid out for; None: oneDNN

    @staticmethod
    def of(*modules: torch.nn.Module, products: RowProducts | None = None) -> PackedLinear:
        for module in modules:
            if not isinstance(module, torch.nn.Linear) or module.weight.dtype != torch.float32:
                raise TypeError(f"{type(module).__name__} is not a float32 nn.Linear")
        linears = cast(tuple[torch.nn.Linear, ...], modules)  # checked just above
        weights = [module.weight.detach() for module in linears]
        biases = [module.bias for module in linears]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)])
        fused = torch.cat(weights) if len(weights) > 1 else weights[0]
        packed = (torch.ops.mkldnn._reorder_linear_weight(fused.contiguous(), ROWS_HINT) if products is None
                  else products.pack(fused))
        return PackedLinear(packed, bias, tuple(w.shape[0] for w in weights), products)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [..., in] -> one [..., out] tensor per fused part (views of one result)."""
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        if self.products is None:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        else:
            out = self.products.product(rows, self.weight, sum(self.widths))
            if self.bias is not None:
                out += self.bias
        return out.view(*x.shape[:-1], out.shape[-1]).split(self.widths, dim=-1)


@dataclass(frozen=True, slots=True)
class PackedLayer:
    qkv: PackedLinear
    o: PackedLinear
    gate_up: PackedLinear
    down: PackedLinear


class PackedWeights:
    """Packed projections of every layer and the LM head of a Llama-family model, for decode steps of
    2+ sequences, and of one too when `for_one` (--packed-weights all); laid out for `products`
    (None: oneDNN)."""

    def __init__(self, model: torch.nn.Module, for_one: bool = False, products: RowProducts | None = None) -> None:
        self.for_one = for_one
        self.products = products
        body: Any = model.model  # a Hugging Face Llama-family model: its submodules are found by name

        def of(*modules: torch.nn.Module) -> PackedLinear:
            return PackedLinear.of(*modules, products=products)

        with torch.inference_mode():
            self.layers = [PackedLayer(of(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                                       of(layer.self_attn.o_proj), of(layer.mlp.gate_proj, layer.mlp.up_proj),
                                       of(layer.mlp.down_proj)) for layer in body.layers]
            self.lm_head = of(cast(torch.nn.Module, model.lm_head))

    @staticmethod
    def build(model: torch.nn.Module, device: torch.device, mode: str,
              products: RowProducts | None = None) -> PackedWeights | None:
        """The packed copy `mode` asks for, laid out for `products` (None: oneDNN), or None (mode
        off, or packing unsupported here: logged)."""
        if mode not in PACKED_MODES:
            raise ValueError(f"packed weights mode must be one of {', '.join(PACKED_MODES)}, got {mode!r}")
        if mode == "off" or _unsupported(model, device, mode):
            return None
        try:
            return PackedWeights(model, for_one=mode == "all", products=products)
        except (AttributeError, TypeError) as error:  # not q/k/v/o + gate/up/down nn.Linear layers (MoE, quantized)
            log.warning("--packed-weights %s: this model's layers are not plain Llama-style linears (%s); "
                        "using F.linear", mode, error)
            return None


class PackedLinearModule(torch.nn.Module):
    """A drop-in for `nn.Linear` that computes on its packed weight (inference only)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = PackedLinear.of(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed(x)[0]


def pack_linears(model: torch.nn.Module, device: torch.device) -> int:
    """Replace every `nn.Linear` of `model` by a packed one (the originals are released, except
    weights still shared with another module); returns how many (0 where packing is unsupported)."""
    if _unsupported(model, device, "all"):
        return 0
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, torch.nn.Linear)]
    count = len(targets)
    with torch.inference_mode():
        while targets:  # drop each original as soon as it is replaced: peak = model + one layer's copy
            parent, name, child = targets.pop()
            setattr(parent, name, PackedLinearModule(child))
            del child
    return count
