"""A stream decoding alone at the speed of memory, bit-identical to Hugging Face (exact_gemv.c).

A batch of one keeps the model's own products so that its logits are Hugging Face's, bit for
bit. On one row `F.linear` calls MKL's sgemm, which on the development machine read the weights at
~16 GB/s (7 ms for the 113 MB LM head, 33 of a 41 ms decode step) where one core reads ~40 GB/s.
Its summation order can be read off with inputs that cancel exactly (a large value, a one and the
large value negated: the one survives only if the two large values meet first), and it is simple:
products rounded one by one, the first one to four (up to the row's first 16-byte boundary) summed
in order, the rest in four running sums by index mod 4, (s0 + s2) + (s1 + s3), the last few
columns added in order, then the bias (exact_gemv.c; a matrix whose row count or row stride is not
a multiple of 4 is summed otherwise and keeps F.linear). The C kernel sums in that order, eight
rows side by side with the next rows prefetched: 3.2 ms for the LM head, ~16 ms for all of the
model's products a token. Which prefetch hint reads fastest differs between machines of the same
kind (NTA gave 35 GB/s on one EPYC; on another it gave 15 and T2 gave 23, against a sequential-read
ceiling of 25): both are built, and the faster on the model's largest layer is kept (logged).

That order is MKL's choice for this CPU (seen on AMD EPYC); another CPU or another BLAS may sum
otherwise. So nothing is assumed: at start, every linear layer's kernel output is compared bit for
bit with `F.linear` on probe vectors, and a layer that differs keeps `F.linear` (`--gemv auto`
logs how many; `native` refuses to start). Only single-row float32 products on the CPU take the
kernel; every other call goes to `F.linear`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F

from services.common.errors import InternalFailure
from services.common.native_build import compiled
from services.common.packed_weights import PackedWeights
from services.decode.gemv_helpers import GemvHelpers
from services.decode.panel_products import PanelKernel

log = logging.getLogger(__name__)

MODES = ("auto", "native", "torch")
SOURCE = Path(__file__).with_name("exact_gemv.c")
PROBE_SEED = 20261129
PROBE_SCALES = (1.0, 1e-3, 1e3)  # hidden states range widely: probe small and large magnitudes too
BUILD_FLAGS = ("-ffp-contract=off", "-pthread")  # no fused multiply-adds; the helpers' threads
PREFETCH_HINTS = {"t2": 1, "nta": 0}  # __builtin_prefetch's locality for each hint; the first is the default


class ExactGemv:
    """The compiled kernel."""

    def __init__(self, library: ctypes.CDLL, hint: str) -> None:
        self.hint = hint  # the prefetch hint it was built with (PREFETCH_HINTS)
        self.library = library  # its helpers' entry points too (gemv_helpers.py)
        self._kernel = library.exact_gemv
        self._kernel.restype = ctypes.c_int
        self._kernel.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3

    @staticmethod
    def build(cache_dir: Path, hint: str = next(iter(PREFETCH_HINTS))) -> ExactGemv | str:
        """The kernel built with this prefetch hint, or why it cannot be built."""
        built = compiled(SOURCE, "exact_gemv", [f"PREFETCH_LOCALITY={PREFETCH_HINTS[hint]}"], cache_dir,
                         flags=BUILD_FLAGS)
        return ExactGemv(built, hint) if isinstance(built, ctypes.CDLL) else built

    @staticmethod
    def fastest(cache_dir: Path, weight: torch.Tensor | None) -> ExactGemv | str:
        """The kernel built with each prefetch hint, the fastest on `weight` (one it `supports`) kept,
        or the default hint's where there is no weight to time: hints change speed, never a bit."""
        if weight is None:
            return ExactGemv.build(cache_dir)
        built = [ExactGemv.build(cache_dir, hint) for hint in PREFETCH_HINTS]
        kernels = [kernel for kernel in built if isinstance(kernel, ExactGemv)]
        if len(kernels) < 2:
            return kernels[0] if kernels else built[0]
        x = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(PROBE_SEED))  # not the global RNG
        with torch.inference_mode():
            seconds = {kernel.hint: _seconds(functools.partial(kernel.product, weight, x)) for kernel in kernels}
        chosen = min(kernels, key=lambda kernel: seconds[kernel.hint])
        log.info("exact gemv kernel: prefetch hint %s (%s on the largest layer, %.1f MB)", chosen.hint,
                 ", ".join(f"{hint} {value * 1e3:.2f} ms" for hint, value in seconds.items()),
                 weight.numel() * weight.element_size() / 1e6)
        return chosen

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        """Whether the kernel can take this weight (the BLAS's order holds for its shape)."""
        rows, width = weight.shape if weight.dim() == 2 else (0, 0)
        return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.stride(1) == 1
                and width >= 8 and weight.stride(0) >= width and weight.stride(0) % 4 == 0 and rows > 0
                and rows % 4 == 0)

    def product(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`weight @ x` for one row `x` (float32, `in_features` values); `weight` as `supports`."""
        out = torch.empty(weight.shape[0], dtype=torch.float32)
        self.product_into(weight, x, out)
        return out

    def product_into(self, weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
        """`product`, written into `out` (`weight.shape[0]` contiguous float32 values on the CPU)."""
        if x.numel() != weight.shape[1] or x.dtype != torch.float32 or x.device.type != "cpu":
            raise InternalFailure("exact gemv kernel: a row that is not the weight's width of float32")
        _check_output(out, weight.shape[0])
        x = x.reshape(-1).contiguous()  # the kernel reads it as one packed row
        self.run((weight.data_ptr(), weight.shape[0], weight.shape[1], weight.stride(0)), x.data_ptr(), out.data_ptr())

    def run(self, weight: tuple[int, int, int, int], x: int, out: int) -> None:
        """The kernel on addresses checked already: the weight's (address, rows, columns, row
        stride), a packed row's and an output's."""
        if self._kernel(weight[0], x, out, *weight[1:]):
            raise InternalFailure("exact gemv kernel refused a weight it had been checked for")

    def agrees(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
        """Whether the kernel's products (plus `bias`, added after the sum as MKL adds it) equal
        `F.linear`'s bit for bit (as integers: -0.0 is not 0.0) on seeded probe vectors."""
        generator = torch.Generator().manual_seed(PROBE_SEED)
        for scale in PROBE_SCALES:
            x = torch.randn(weight.shape[1], generator=generator) * scale
            product = self.product(weight, x)
            if not same_bits(product if bias is None else product + bias, F.linear(x[None], weight, bias)[0]):
                return False
        return True

    def faster(self, weight: torch.Tensor) -> bool:
        """Whether the kernel (one thread) beats `F.linear` (torch's threads) on this weight: with
        several threads MKL may, where one core cannot read memory as fast as all of them."""
        x = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(PROBE_SEED))
        return _seconds(lambda: self.product(weight, x)) < _seconds(lambda: F.linear(x[None], weight))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _seconds(run: Callable[[], object], repeats: int = 5) -> float:
    run()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


class ExactGemvLinear(torch.nn.Module):
    """A drop-in for an `nn.Linear` (sharing its weight and bias): one row through the kernel (the
    bias added to the sum after it, as MKL adds it), anything else through `F.linear`."""

    weight: torch.Tensor  # registered parameters (annotations for the type checker only)
    bias: torch.Tensor | None
    # products of many rows by the module's weight now (a prompt the decode prefills itself), set
    # by prompt_products: None where it does not take them
    rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None

    def __init__(self, linear: torch.nn.Linear, kernel: ExactGemv, helpers: GemvHelpers | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # registered even where None, so that `_parameters` always holds both (read there: faster
        # than the module's attribute lookup, which the hot path would pay twice a product)
        self.register_parameter("weight", cast(torch.nn.Parameter, linear.weight))  # an nn.Linear's is one
        self.register_parameter("bias", linear.bias)
        self._kernel: ExactGemv | GemvHelpers = kernel if helpers is None else helpers  # each with the same `run`
        weight, bias = linear.weight, linear.bias
        self._checked = (weight, bias, _layout(weight, bias))  # what `install` checked, and where it lay
        self._weight_arguments = (weight.data_ptr(), weight.shape[0], weight.shape[1], weight.stride(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._takes(x):
            many = None if self.rows is None else self.rows(x, self.weight)
            return F.linear(x, self.weight, self.bias) if many is None else many
        out = torch.empty(self.out_features, dtype=torch.float32)
        self._write(x, out)
        return out.view(*x.shape[:-1], self.out_features)

    def into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """`self(x)` for one row `x`, written into `out` (`out_features` contiguous float32 values,
        a part of a larger buffer: one_stream.py)."""
        if self._takes(x):
            self._write(x, out)
        else:
            out.copy_(F.linear(x.reshape(1, -1), self.weight, self.bias).view(-1))

    def _write(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """The kernel's product for a row `_takes`, into `out` (checked here: this is the hot path,
        so the weight's arguments come from the layout `_takes` has just found unchanged)."""
        _check_output(out, self.out_features)
        row = x if x.is_contiguous() else x.contiguous()  # the kernel reads it as one packed row
        self._kernel.run(self._weight_arguments, row.data_ptr(), out.data_ptr())
        bias = self._checked[1]  # the module's own: `_takes` has just found it unchanged
        if bias is not None:
            torch.add(bias, out, out=out)  # bias + sum: where both are NaN, MKL's NaN (the sum's) is kept

    def _takes(self, x: torch.Tensor) -> bool:
        """One float32 row on the CPU, of the weight's width; the weight and bias still the ones
        checked, where and as they lay (a module cast, moved, re-laid or given others since falls
        back); nothing for autograd to record."""
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        checked_weight, checked_bias, layout = self._checked
        return (weight is checked_weight and bias is checked_bias and _layout(weight, bias) == layout
                and x.numel() == self.in_features and x.dtype == torch.float32 and x.is_cpu
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                      or (bias is not None and bias.requires_grad))))


def _check_output(out: torch.Tensor, rows: int) -> None:
    if out.numel() != rows or out.dtype != torch.float32 or not out.is_cpu or not out.is_contiguous():
        raise InternalFailure("exact gemv kernel: an output that is not the weight's height of packed float32")


def _layout(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[object, ...]:
    return (weight.data_ptr(), weight.shape, weight.stride(), weight.dtype,
            None if bias is None else (bias.data_ptr(), bias.shape, bias.dtype))


@dataclass(frozen=True, slots=True)
class Installed:
    """What `install` did: how many layers it replaced, and the helpers it started (or None)."""

    layers: int
    helpers: GemvHelpers | None


def install(model: torch.nn.Module, cache_dir: Path, mode: str, helper_cores: Sequence[int] = (),
            packed: PackedWeights | None = None) -> Installed:
    """Replace each float32 `nn.Linear` of `model` whose products the kernel reproduces
    by an `ExactGemvLinear`: `mode` auto takes those that agree, unless torch's threads make
    `F.linear` the faster (logged); native raises ValueError unless all agree; torch takes none.
    With `helper_cores`, threads there help with their products, and with the batched steps'
    where `packed` is laid out for the panel kernel (gemv_helpers.py)."""
    if mode not in MODES:
        raise ValueError(f"gemv must be one of {', '.join(MODES)}, got {mode!r}")
    panels = _panel_layout(packed)
    if mode == "torch":
        helped = panels is not None and bool(helper_cores)
        return Installed(0, _helpers(ExactGemv.build(cache_dir), helper_cores, [], panels) if helped else None)
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, torch.nn.Linear)]
    weights = [child.weight.detach() for _, _, child in targets if ExactGemv.supports(child.weight)]
    kernel = ExactGemv.fastest(cache_dir, max(weights, default=None, key=lambda weight: weight.numel()))
    replacements, reason = ([], kernel) if isinstance(kernel, str) else _replacements(kernel, targets, mode)
    if reason and mode == "native":
        raise ValueError(f"--gemv native cannot be used here: {reason}")
    helpers = _helpers(kernel, helper_cores, [child for _, _, child in replacements], panels)
    if replacements and isinstance(kernel, ExactGemv):  # a kernel wherever there are replacements
        for parent, name, child in replacements:
            setattr(parent, name, ExactGemvLinear(child, kernel, helpers))
    if replacements:
        log.info("a batch of one computes %d of %d linear layers with the exact gemv kernel%s", len(replacements),
                 len(targets), f" (not the rest: {reason})" if reason else "")
    else:
        log.info("a batch of one computes its products with F.linear (the exact gemv kernel: %s)", reason)
    return Installed(len(replacements), helpers)


Target = tuple[torch.nn.Module, str, torch.nn.Linear]


def _replacements(kernel: ExactGemv, targets: list[Target], mode: str) -> tuple[list[Target], str]:
    """The layers whose products the kernel reproduces (none in `auto` where torch's threads make
    `F.linear` the faster), and why not the rest ('' when none is left)."""
    agreeing = [target for target in targets if _agrees(kernel, target[2])]
    reason = "" if len(agreeing) == len(targets) else (
        f"{len(targets) - len(agreeing)} of {len(targets)} linear layers: this machine's BLAS sums them in "
        "another order, or they have another dtype or layout")
    if agreeing and mode == "auto" and torch.get_num_threads() > 1:
        largest = max((child.weight for _, _, child in agreeing), key=lambda weight: weight.numel())
        with torch.inference_mode():
            if not kernel.faster(largest.detach()):
                return [], f"F.linear on {torch.get_num_threads()} threads is faster here"
    return agreeing, reason


def _agrees(kernel: ExactGemv, linear: torch.nn.Linear) -> bool:
    bias = linear.bias
    if not kernel.supports(linear.weight) or (bias is not None and bias.dtype != torch.float32):
        return False
    with torch.inference_mode():
        return kernel.agrees(linear.weight.detach(), None if bias is None else bias.detach())


def _panel_layout(packed: PackedWeights | None) -> tuple[PanelKernel, list[torch.Tensor]] | None:
    """The panel kernel batched steps compute on and its panels, where `packed` is laid out for it."""
    if packed is None or not isinstance(packed.products, PanelKernel):
        return None
    linears = [linear for layer in packed.layers for linear in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    return packed.products, [linear.weight for linear in (*linears, packed.lm_head)]


def _helpers(kernel: ExactGemv | str, cores: Sequence[int], linears: list[torch.nn.Linear],
             panels: tuple[PanelKernel, list[torch.Tensor]] | None) -> GemvHelpers | None:
    """Helpers on `cores` for these layers' products and the batched steps' `panels` (the panel
    kernel is then helped by them), or None (none asked for or nothing to help with, or they cannot
    start: logged)."""
    if not cores or not (linears or panels) or isinstance(kernel, str):
        return None
    helpers = GemvHelpers.start(kernel.library, cores, [linear.weight.detach() for linear in linears],
                                panels[1] if panels else ())
    if isinstance(helpers, str):
        log.warning("the decode computes its products on one core: %s", helpers)
        return None
    if panels:
        panels[0].helped_by(helpers)
    log.info("the decode's products (%s) are helped by threads on cores %s, at SCHED_IDLE",
             " and ".join(["a batch of one's"] * bool(linears) + ["batched steps'"] * bool(panels)),
             list(helpers.cores))
    return helpers
