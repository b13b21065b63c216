"""A prompt's matrix products at the core's arithmetic speed, bit-identical to `F.linear`
(the panel kernel of services/decode/panel_gemm.c, with k summed in blocks): on the prefill worker
(`--prefill-products`) and on a decode worker for the prompts it prefills itself.

A prefill is matrix products of the prompt's rows by every weight of the model. torch's CPU wheel
computes them with MKL, which on AMD CPUs does not take its AVX-512 code: on a Zen 5 EPYC one core
computed 450 x 576 x 1536 at ~95 GFLOP/s, where the panel kernel computes ~230 (`make
bench-prefill`). Its sums must be MKL's bit for bit, or a prompt's KV and first token would differ
in the last bits from Hugging Face's. MKL's order, read off there by trying candidates bit for bit:
from 4 rows on, each output sums k in blocks of 192 (each block's products added in order onto zero
with fused multiply-adds) and adds the blocks' sums in order; fewer rows take another path. The
kernel sums that way for a given block size.

Nothing is assumed: at start, for each weight shape of the model, the block size is read off the
same way (candidates tried on a layer's own weight and seeded rows), then the row counts it holds
for (PROBE_ROWS, under this process's torch threads: with 2 threads MKL sums some counts under 12
otherwise; each probe within PROBE_PRODUCTS multiply-adds, so a larger model's layers, and
SmolLM2's LM head, are probed to fewer rows: logged), and every layer is checked once more on its
own weight. Products of rows outside the probed range, and of a shape or layer without a match,
keep `F.linear`, as do those of a weight changed since its panels were made. `auto` also times both on a
prompt-sized product and keeps the faster (logged); `native` takes the kernel wherever the order
matches.

The kernel reads the weights laid out in panels; the originals stay for the other products. The
prefill worker holds its own panels: the model's linear weights once more (538 MB for
SmolLM2-135M, its LM head's 113 included, which computes every row of a prompt's log-probabilities;
the head's probes stop at 256 rows, the most it is given at once). On a decode (`on_decode`) only
the modules the exact gemv kernel took (`ExactGemvLinear`) are given the kernel, as their `rows`
hook, so the module objects other paths read stay what they were; the panels are those its batched
steps hold (`PackedWeights` on the panel kernel), lent, and where there are none only `native`
makes a copy.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from services.common.packed_weights import PackedWeights
from services.common.worker import PROMPT_PRODUCTS_MODES
from services.decode.exact_gemv import ExactGemvLinear, same_bits
from services.decode.panel_products import PanelKernel

log = logging.getLogger(__name__)

MODES = PROMPT_PRODUCTS_MODES
BLOCKS = (192, 128, 256, 384, 512, 96, 64, 32)  # block sizes tried first; k itself (one sum) last
PROBE_ROWS = (*range(4, 17), 24, 31, 33, 63, 64, 100, 128, 256, 512, 1000, 1500, 2048)  # 2048: a prefill chunk
ORDER_ROWS = 64  # the row count a block size is first tried at
PROBE_PRODUCTS = 8 * 10**9  # multiply-adds a probe beyond ORDER_ROWS may take (an LM head's: up to 256 rows)
LAYER_ROWS = 16  # the rows each layer is checked on
TIMING_ROWS = 128
SEED = 20261201


@dataclass(frozen=True, slots=True)
class SumOrder:
    """How the BLAS sums one weight shape's products: k in blocks of `block`, for `min_rows` to
    `max_rows` rows."""

    block: int
    min_rows: int
    max_rows: int


class RowsProduct:
    """Products of `order.min_rows` to `order.max_rows` rows by one weight's panels, in the BLAS's order."""

    def __init__(self, kernel: PanelKernel, panels: torch.Tensor, weight: torch.Tensor, order: SumOrder) -> None:
        self._kernel, self._panels, self._weight, self._order = kernel, panels, weight, order
        self.out_features, self.in_features = weight.shape
        self._packed_from = _state(weight)  # the panels are a copy of these values

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """x [..., in] times `weight`, the module's weight now, or None where the kernel does not
        take it (a row count outside the order's, not float32 on the CPU, another width, autograd
        recording, or a weight other than the panels', or changed since they were made)."""
        if x.dtype != torch.float32 or x.shape[-1] != self.in_features or not x.is_cpu or \
                (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) or \
                weight is not self._weight or _state(weight) != self._packed_from:
            return None
        rows = x.reshape(-1, self.in_features)
        if not self._order.min_rows <= rows.shape[0] <= self._order.max_rows:
            return None
        out = self._kernel.product(rows.contiguous(), self._panels, self.out_features, self._order.block)
        return out.view(*x.shape[:-1], self.out_features)


def _state(weight: torch.Tensor) -> tuple[int, int]:
    """Where a weight's values lie and its version (bumped by each in-place change; an inference
    tensor has none, and cannot be changed in place outside inference mode)."""
    try:
        return weight.data_ptr(), weight._version
    except RuntimeError:
        return weight.data_ptr(), -1


class ExactLinear(torch.nn.Module):
    """A drop-in for a bias-free float32 `nn.Linear` (its `weight`, and `bias` None): what `rows`
    takes by the panel kernel, the rest through `F.linear`."""

    def __init__(self, linear: torch.nn.Linear, rows: RowsProduct) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", None)  # read by code that takes any linear layer's weight and bias
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rows(x, self.weight)
        return F.linear(x, self.weight) if out is None else out


Layer = torch.nn.Linear | ExactGemvLinear
Target = tuple[torch.nn.Module, str, Layer]


def install(model: torch.nn.Module, device: torch.device, cache_dir: Path, mode: str,
            packed: PackedWeights | None = None, *, on_decode: bool = False) -> int:
    """Give the model's linear layers the kernel's products of many rows where `mode` and this
    machine want it (see the module docstring); returns how many layers."""
    if mode not in MODES:
        raise ValueError(f"prefill_products must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "torch":
        return 0
    targets = _targets(model, device, on_decode)
    lent = packed.products if packed is not None and isinstance(packed.products, PanelKernel) else None
    kernel = _unlent(targets, mode, on_decode, lent is not None) or lent or PanelKernel.build(cache_dir)
    if isinstance(kernel, str):
        if mode == "native":
            raise ValueError(f"--prefill-products native cannot be used here: {kernel}")
        log.info("prompt products: torch's (the panel kernel is not used: %s)", kernel)
        return 0
    with torch.inference_mode():
        views = _lent_panels(model, packed) if lent is not None else {}
        panels = _Panels(kernel, views)
        first = _by_shape(targets)
        orders = {shape: read_order(kernel, layer.weight.detach(), panels.of(layer)) for shape, layer in first.items()}
        if mode == "auto" and not _kernel_faster(kernel, first, orders, panels):
            return 0
        given = on_lent = 0
        for parent, name, layer in targets:
            order = orders[_shape(layer)]
            if order is None or not _agrees(kernel, layer.weight.detach(), panels.of(layer), order):
                continue
            rows = RowsProduct(kernel, panels.of(layer), layer.weight, order)
            if isinstance(layer, ExactGemvLinear):
                layer.rows = rows
            else:
                setattr(parent, name, ExactLinear(layer, rows))
            given, on_lent = given + 1, on_lent + (id(layer) in views)
    log.info("prompt products: the panel kernel on %d of %d linear layers, %d of them on the batched steps' panels "
             "(%s)", given, len(targets), on_lent,
             "; ".join(f"{n}x{k}: " + (f"k in blocks of {o.block}, {o.min_rows} to {o.max_rows} rows" if o
                                       else "torch's, no order matched") for (n, k), o in orders.items()))
    return given


class _Panels:
    """Each layer's panels: lent where `lent` holds them (by the layer's id), else packed once, when
    first asked for (only the layers the kernel takes are packed)."""

    def __init__(self, kernel: PanelKernel, lent: dict[int, torch.Tensor]) -> None:
        self._kernel, self._held = kernel, dict(lent)

    def of(self, layer: Layer) -> torch.Tensor:
        if id(layer) not in self._held:
            self._held[id(layer)] = self._kernel.pack(layer.weight.detach())
        return self._held[id(layer)]


def _unlent(targets: list[Target], mode: str, on_decode: bool, lent: bool) -> str:
    """Why the kernel is not used ('' where it may be)."""
    if not targets:
        return ("no linear layer it can take (" + ("on a decode, those the exact gemv kernel took: none, see --gemv"
                if on_decode else "bias-free float32 nn.Linear on the CPU; --packed-weights all replaces them") + ")")
    if on_decode and mode == "auto" and not lent:
        return "the batched steps hold no panels to lend; native makes a copy of the weights"
    return ""


def read_order(kernel: PanelKernel, weight: torch.Tensor, panels: torch.Tensor) -> SumOrder | None:
    """The block size and row counts at which the kernel's products by `weight` (laid out as
    `panels`) are `F.linear`'s, bit for bit, on seeded rows; None where no candidate matches at
    ORDER_ROWS and beyond."""
    in_features = weight.shape[1]
    generator = torch.Generator().manual_seed(SEED)

    def same(rows: int, block: int) -> bool:
        return _matches(kernel, weight, panels, rows, block, generator)

    candidates = [block for block in BLOCKS if block < in_features] + [in_features]
    block = next((candidate for candidate in candidates if same(ORDER_ROWS, candidate)), None)
    if block is None:
        return None
    probes = [rows for rows in PROBE_ROWS if rows <= ORDER_ROWS or rows * weight.numel() <= PROBE_PRODUCTS]
    holds = [same(rows, block) for rows in probes]
    first = len(holds)
    while first > 0 and holds[first - 1]:
        first -= 1
    # the order must hold from ORDER_ROWS rows up to the most probed, and is used only up to there
    return SumOrder(block, probes[first], probes[-1]) if first <= probes.index(ORDER_ROWS) else None


def _agrees(kernel: PanelKernel, weight: torch.Tensor, panels: torch.Tensor, order: SumOrder) -> bool:
    """Whether one layer's products are `F.linear`'s, bit for bit, on LAYER_ROWS seeded rows."""
    return _matches(kernel, weight, panels, max(LAYER_ROWS, order.min_rows), order.block,
                    torch.Generator().manual_seed(SEED))


def _matches(kernel: PanelKernel, weight: torch.Tensor, panels: torch.Tensor, rows: int, block: int,
             generator: torch.Generator) -> bool:
    """Whether the kernel's products of `rows` rows drawn from `generator` are `F.linear`'s, bit for bit."""
    x = torch.randn(rows, weight.shape[1], generator=generator)
    return same_bits(kernel.product(x, panels, weight.shape[0], block), F.linear(x, weight))


def _targets(model: torch.nn.Module, device: torch.device, on_decode: bool) -> list[Target]:
    """(parent, attribute, layer) of each linear layer the kernel can take."""
    if device.type != "cpu":
        return []
    kinds = (ExactGemvLinear,) if on_decode else (torch.nn.Linear, ExactGemvLinear)
    found: list[Target] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, kinds) and child.bias is None and child.weight.dtype == torch.float32:
                found.append((parent, name, child))
    return found


def _lent_panels(model: torch.nn.Module, packed: PackedWeights | None) -> dict[int, torch.Tensor]:
    """Each layer's panels within the fused panels of `packed` (by the layer's id), where its
    columns start on a panel (the kernel writes only a layer's own columns of its last panel)."""
    if packed is None or not isinstance(packed.products, PanelKernel):
        return {}
    width = packed.products.width
    views: dict[int, torch.Tensor] = {}
    body = getattr(model, "model", None)
    for layer, fused in zip(getattr(body, "layers", []), packed.layers):
        attention, mlp = layer.self_attn, layer.mlp
        for parts, linear in (((attention.q_proj, attention.k_proj, attention.v_proj), fused.qkv),
                              ((attention.o_proj,), fused.o), ((mlp.gate_proj, mlp.up_proj), fused.gate_up),
                              ((mlp.down_proj,), fused.down)):
            start = 0
            for part, columns in zip(parts, linear.widths):
                if start % width == 0:
                    views[id(part)] = linear.weight[start // width : start // width + math.ceil(columns / width)]
                start += columns
    head = getattr(model, "lm_head", None)
    if head is not None and len(packed.lm_head.widths) == 1:
        views[id(head)] = packed.lm_head.weight
    return views


def _shape(linear: Layer) -> tuple[int, int]:
    return linear.out_features, linear.in_features


def _by_shape(targets: list[Target]) -> dict[tuple[int, int], Layer]:
    """The first layer of each weight shape, in the model's order."""
    first: dict[tuple[int, int], Layer] = {}
    for _, _, linear in targets:
        first.setdefault(_shape(linear), linear)
    return first


def _kernel_faster(kernel: PanelKernel, layers: dict[tuple[int, int], Layer],
                   orders: dict[tuple[int, int], SumOrder | None], panels: _Panels) -> bool:
    """Whether the kernel computes one layer of each matching shape on TIMING_ROWS rows faster
    than `F.linear` (the two timed in turn, best of three)."""
    matched = [(layers[shape], panels.of(layers[shape]), order) for shape, order in orders.items()
               if order is not None]
    if not matched:
        log.info("prompt products: torch's (the kernel's sums match no weight shape's here)")
        return False
    generator = torch.Generator().manual_seed(SEED)
    inputs = {linear.in_features: torch.randn(TIMING_ROWS, linear.in_features, generator=generator)
              for linear, _, _ in matched}
    seconds = {"kernel": math.inf, "torch": math.inf}
    for _ in range(3):
        started = time.perf_counter()
        for linear, layer_panels, order in matched:
            kernel.product(inputs[linear.in_features], layer_panels, linear.out_features, order.block)
        seconds["kernel"] = min(seconds["kernel"], time.perf_counter() - started)
        started = time.perf_counter()
        for linear, _, _ in matched:
            F.linear(inputs[linear.in_features], linear.weight)
        seconds["torch"] = min(seconds["torch"], time.perf_counter() - started)
    faster = seconds["kernel"] < seconds["torch"]
    log.info("prompt products: %s (%d rows through one layer of each shape: the panel kernel %.1f ms, torch %.1f ms)",
             "the panel kernel" if faster else "torch's", TIMING_ROWS, seconds["kernel"] * 1e3, seconds["torch"] * 1e3)
    return faster
