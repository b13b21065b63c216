"""A prompt's matrix products at the core's arithmetic speed, bit-identical to `F.linear`
(the panel kernel of services/decode/panel_gemm.c, with k summed in blocks).

A prefill is matrix products of the prompt's rows by every weight of the model. torch's CPU wheel
computes them with MKL, which on AMD CPUs does not take its AVX-512 code: on a Zen 5 EPYC one core
computed 450 x 576 x 1536 at ~95 GFLOP/s, where the panel kernel computes ~230 (`make
bench-prefill-products`). Its sums must be MKL's bit for bit, or a prompt's KV and first token would
differ in the last bits from Hugging Face's. MKL's order, read off there by trying candidates bit
for bit: from 4 rows on, each output sums k in blocks of 192 (each block's products added in order
onto zero with fused multiply-adds) and adds the blocks' sums in order; fewer rows take another
path. The kernel sums that way for a given block size.

Nothing is assumed: at start, for each weight shape of the model, the block size is read off the
same way (candidates tried on the layer's own weight and seeded rows), then the row counts from
which it holds (PROBE_ROWS, under this process's torch threads: with 2 threads MKL sums some row
counts under 12 otherwise). A shape without a match keeps `F.linear`; so do products of fewer rows.
`auto` also times both on a prompt-sized product and keeps the faster (logged); `native` takes the
kernel wherever the order matches. The kernel reads its own copy of the weights, laid out in
panels, and the originals stay for the smaller products: the decoder's linear weights once more in
memory (425 MB for SmolLM2-135M). The LM head, tied to the embeddings and computed on one row,
is left alone.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from services.decode.exact_gemv import same_bits
from services.decode.panel_products import PanelKernel

log = logging.getLogger(__name__)

MODES = ("auto", "native", "torch")
BLOCKS = (192, 128, 256, 384, 512, 96, 64, 32)  # block sizes tried first; k itself (one sum) last
PROBE_ROWS = (*range(4, 17), 24, 32, 64, 128, 256, 1024)
ORDER_ROWS = 64  # the row count a block size is first tried at
TIMING_ROWS = 256
SEED = 20261201


@dataclass(frozen=True, slots=True)
class SumOrder:
    """How the BLAS sums one weight shape's products: k in blocks of `block`, from `min_rows` rows on."""

    block: int
    min_rows: int


class ExactLinear(torch.nn.Module):
    """A drop-in for a bias-free float32 `nn.Linear` (inference only): products of `order.min_rows`
    rows or more by the panel kernel, in the BLAS's order; fewer through `F.linear`."""

    def __init__(self, linear: torch.nn.Linear, kernel: PanelKernel, order: SumOrder) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.panels = kernel.pack(linear.weight.detach())
        self._kernel, self._order = kernel, order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] < self._order.min_rows or x.dtype != torch.float32:
            return F.linear(x, self.weight)
        out = self._kernel.product(rows.contiguous(), self.panels, self.out_features, self._order.block)
        return out.view(*x.shape[:-1], self.out_features)


def install(model: torch.nn.Module, device: torch.device, cache_dir: Path, mode: str) -> int:
    """Put `ExactLinear` in place of the model's linear layers where `mode` and this machine want
    it (see the module docstring); returns how many were replaced."""
    if mode not in MODES:
        raise ValueError(f"prefill_products must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "torch":
        return 0
    targets = _targets(model, device)
    built = PanelKernel.build(cache_dir) if targets else "no bias-free float32 linear layer on the CPU"
    if isinstance(built, str):
        if mode == "native":
            raise ValueError(f"--prefill-products native cannot be used here: {built}")
        log.info("prefill products: torch's (the panel kernel cannot be used: %s)", built)
        return 0
    with torch.inference_mode():
        orders = {shape: read_order(built, linear.weight.detach()) for shape, linear in _by_shape(targets).items()}
        if mode == "auto" and not _kernel_faster(built, _by_shape(targets), orders):
            return 0
        kept = [(parent, name, child, orders[_shape(child)]) for parent, name, child in targets]
        for parent, name, child, order in kept:
            if order is not None:
                setattr(parent, name, ExactLinear(child, built, order))
    replaced = sum(order is not None for *_, order in kept)
    log.info("prefill products: the panel kernel on %d of %d linear layers (%s)", replaced, len(targets),
             "; ".join(f"{n}x{k}: " + (f"k in blocks of {o.block} from {o.min_rows} rows" if o else "torch's, no order "
                                       "matched") for (n, k), o in orders.items()))
    return replaced


def read_order(kernel: PanelKernel, weight: torch.Tensor) -> SumOrder | None:
    """The block size and row counts at which the kernel's products by `weight` are `F.linear`'s,
    bit for bit, on seeded rows; None where no candidate matches at ORDER_ROWS and beyond."""
    out_features, in_features = weight.shape
    panels = kernel.pack(weight)
    generator = torch.Generator().manual_seed(SEED)

    def same(rows: int, block: int) -> bool:
        x = torch.randn(rows, in_features, generator=generator)
        return same_bits(kernel.product(x, panels, out_features, block), F.linear(x, weight))

    candidates = [block for block in BLOCKS if block < in_features] + [in_features]
    block = next((candidate for candidate in candidates if same(ORDER_ROWS, candidate)), None)
    if block is None:
        return None
    holds = [same(rows, block) for rows in PROBE_ROWS]
    first = len(holds)
    while first > 0 and holds[first - 1]:
        first -= 1
    # the order must hold from ORDER_ROWS rows up to the most probed
    return SumOrder(block, PROBE_ROWS[first]) if first <= PROBE_ROWS.index(ORDER_ROWS) else None


def _targets(model: torch.nn.Module, device: torch.device) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """(parent, attribute, layer) of each linear layer the kernel can take: the LM head is not one."""
    if device.type != "cpu":
        return []
    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    found: list[tuple[torch.nn.Module, str, torch.nn.Linear]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.Linear) and child is not head and child.bias is None \
                    and child.weight.dtype == torch.float32:
                found.append((parent, name, child))
    return found


def _shape(linear: torch.nn.Linear) -> tuple[int, int]:
    return linear.out_features, linear.in_features


def _by_shape(targets: list[tuple[torch.nn.Module, str, torch.nn.Linear]]) -> dict[tuple[int, int], torch.nn.Linear]:
    """The first layer of each weight shape, in the model's order."""
    first: dict[tuple[int, int], torch.nn.Linear] = {}
    for _, _, linear in targets:
        first.setdefault(_shape(linear), linear)
    return first


def _kernel_faster(kernel: PanelKernel, layers: dict[tuple[int, int], torch.nn.Linear],
                   orders: dict[tuple[int, int], SumOrder | None]) -> bool:
    """Whether the kernel computes one layer of each matching shape on TIMING_ROWS rows faster
    than `F.linear` (the two timed in turn, best of three)."""
    matched = [(layers[shape], kernel.pack(layers[shape].weight.detach()), order)
               for shape, order in orders.items() if order is not None]
    if not matched:
        log.info("prefill products: torch's (the kernel's sums match no weight shape's here)")
        return False
    generator = torch.Generator().manual_seed(SEED)
    inputs = {linear.in_features: torch.randn(TIMING_ROWS, linear.in_features, generator=generator)
              for linear, _, _ in matched}
    seconds = {"kernel": math.inf, "torch": math.inf}
    for _ in range(3):
        started = time.perf_counter()
        for linear, panels, order in matched:
            kernel.product(inputs[linear.in_features], panels, linear.out_features, order.block)
        seconds["kernel"] = min(seconds["kernel"], time.perf_counter() - started)
        started = time.perf_counter()
        for linear, _, _ in matched:
            F.linear(inputs[linear.in_features], linear.weight)
        seconds["torch"] = min(seconds["torch"], time.perf_counter() - started)
    faster = seconds["kernel"] < seconds["torch"]
    log.info("prefill products: %s (%d rows through one layer of each shape: the panel kernel %.1f ms, torch %.1f ms)",
             "the panel kernel" if faster else "torch's", TIMING_ROWS, seconds["kernel"] * 1e3, seconds["torch"] * 1e3)
    return faster
