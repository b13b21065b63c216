"""A batched decode step's products by a small C kernel that reads each weight once (panel_gemm.c).

A decode step of a few sequences multiplies a few rows by every weight of the model: at 16 rows
SmolLM2-135M's 540 MB of weights meet 4.3 GFLOP, so the step is bound by memory or by the
core's arithmetic, and the matrices are far larger than the caches. oneDNN's packed products
(`--packed-weights`, the default before this kernel) reach neither bound on some CPUs: on a
2-core AMD EPYC (Zen 3, AVX2) they took 160 ms of a 16-row step's ~200 (27 GFLOPS, 3.4 GB/s).
The kernel keeps each weight in panels of 16 (AVX2) or 32 (AVX-512) output columns laid out k by
k, streams them in order with the next panels prefetched, and computes up to six rows per pass
as outer products in registers. Measured there on all of a step's products (one thread, weights
cold): 8 rows 52-80 against 82-141 ms for oneDNN, 16 rows 98-111 against 114-163.

It is compiled at the decode's start for the machine (services.common.native_build) and its
products are checked against F.linear's on one layer. Which computes faster differs between CPUs,
so `--batched-products auto` times both on the model's first layers, 64 MB of weights (more than a
last-level cache, as a step's are), one after another at a few row counts, and keeps the faster
(logged; timing only the LM head favoured oneDNN, whose per-call cost is what the kernel saves);
`native` takes the kernel (refusing to start where it cannot be built) and `onednn` keeps
oneDNN's. Either replaces the other's copy of the weights, so memory is the same. A batch of one
is not affected unless `--packed-weights all` puts it on the packed weights.
"""

from __future__ import annotations

import ctypes
import logging
import math
import time
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F

from services.common.errors import InternalFailure
from services.common.native_build import compiled
from services.common.packed_weights import PackedLinear, packing_unsupported
from services.decode.gemv_helpers import HELPED_ROWS, GemvHelpers

log = logging.getLogger(__name__)

MODES = ("auto", "native", "onednn")
SOURCE = Path(__file__).with_name("panel_gemm.c")
PROBE_ROWS = (4, 16, 32)  # the batch sizes auto times both on: where the kernel should win, and where it may not
PROBE_BYTES = 64 << 20  # weights auto times them on: more than a CPU's last-level cache holds, as a step's are
PROBE_SEED = 20261130


class PanelKernel:
    """The compiled kernel: packs weights into its panels and multiplies rows by them."""

    def __init__(self, library: ctypes.CDLL) -> None:
        library.panel_width.restype = ctypes.c_int
        self.width = int(library.panel_width())  # output columns of a panel (16 with AVX2, 32 with AVX-512)
        self._kernel = library.panel_gemm_blocked
        self._kernel.restype = ctypes.c_int
        self._kernel.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
        # what helper threads call (exact_gemv.c's shared_panels_run), by address
        self._columns = cast(int, ctypes.cast(library.panel_gemm_columns, ctypes.c_void_p).value)
        self._helpers: GemvHelpers | None = None

    @staticmethod
    def build(cache_dir: Path) -> PanelKernel | str:
        """The kernel, or why it cannot be built."""
        built = compiled(SOURCE, "panel_gemm", [], cache_dir, flags=("-ffp-contract=fast",))
        return PanelKernel(built) if isinstance(built, ctypes.CDLL) else built

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` [out, in] as panels [ceil(out / width), in, width] (the last zero-padded)."""
        out_features, in_features = weight.shape
        full, left = divmod(out_features, self.width)
        panels = weight.new_zeros(full + (left > 0), in_features, self.width)  # the only copy made
        panels[:full] = weight[:full * self.width].view(full, self.width, in_features).transpose(1, 2)
        if left:
            panels[full, :, :left] = weight[full * self.width:].t()
        return panels

    def helped_by(self, helpers: GemvHelpers) -> None:
        """Products of up to HELPED_ROWS rows by panels `helpers` were started for (or views of
        them) are shared with them from now on (gemv_helpers.py); others are computed alone."""
        self._helpers = helpers

    def product(self, rows: torch.Tensor, panels: torch.Tensor, out_features: int, block: int = 0) -> torch.Tensor:
        """`rows` [m, in] times the weight `pack` gave `panels` for: [m, out_features]. Each output
        sums its products in order, in blocks of `block` of them (0: one block) whose sums are
        added in order (services/decode/prompt_products.py says why)."""
        if not (rows.dim() == 2 and rows.dtype == panels.dtype == torch.float32 and rows.is_contiguous()
                and panels.is_contiguous() and rows.device.type == panels.device.type == "cpu"
                and panels.dim() == 3 and panels.shape[1:] == (rows.shape[1], self.width)
                and panels.shape[0] == math.ceil(out_features / self.width)):
            raise InternalFailure("panel kernel: its inputs are not laid out as it reads them")
        out = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
        in_features, helpers = rows.shape[1], self._helpers
        # helped where the helpers may read these panels (others, e.g. a layer a decode packed itself: alone)
        helped = helpers is not None and 0 < rows.shape[0] <= HELPED_ROWS and in_features > 0 and \
            helpers.panels_run(self._columns, self.width, rows, panels, out, block or in_features)
        if not helped and self._kernel(rows.data_ptr(), panels.data_ptr(), out.data_ptr(), rows.shape[0],
                                       out_features, in_features, block or max(in_features, 1)):
            raise InternalFailure("panel kernel refused its sizes")
        return out


def choose(model: torch.nn.Module, device: torch.device, cache_dir: Path, mode: str) -> PanelKernel | None:
    """The kernel where `mode` and this machine want it for batched steps, else None (oneDNN's)."""
    if mode not in MODES:
        raise ValueError(f"batched_products must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "onednn":
        return None
    unpacked = packing_unsupported(device, next(model.parameters()).dtype)
    if unpacked and mode == "auto":
        return None  # nothing is packed at all (PackedWeights.build logs why)
    built = unpacked or PanelKernel.build(cache_dir)
    linears = _probe_linears(model)
    if not isinstance(built, str) and linears and not _agrees(built, linears[0]):
        built = "its products differ from F.linear's (a miscompiled or unusual build)"
    if isinstance(built, str):
        if mode == "native":
            raise ValueError(f"--batched-products native cannot be used here: {built}")
        log.info("batched products: oneDNN's (the panel kernel cannot be used: %s)", built)
        return None
    if mode == "native":
        log.info("batched products: the panel kernel (--batched-products native)")
        return built
    return _faster(built, linears) if linears else None  # none: nothing to pack (packing logs why)


def _probe_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The model's first float32 linear layers, in a step's order, until PROBE_BYTES of weights."""
    chosen: list[torch.nn.Linear] = []
    size = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32 and size < PROBE_BYTES:
            chosen.append(module)
            size += module.weight.numel() * module.weight.element_size()
    return chosen


def _agrees(kernel: PanelKernel, linear: torch.nn.Linear) -> bool:
    """Whether the kernel's products on `linear` are F.linear's within rounding, on seeded rows."""
    with torch.inference_mode():
        x = torch.randn(PROBE_ROWS[0], linear.in_features, generator=torch.Generator().manual_seed(PROBE_SEED))
        expected = F.linear(x, linear.weight)
        got = kernel.product(x, kernel.pack(linear.weight.detach()), linear.out_features)
        return torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def _faster(kernel: PanelKernel, linears: list[torch.nn.Linear]) -> PanelKernel | None:
    """The kernel if it computes the products of `linears`, one after another as a step does and
    at each of PROBE_ROWS, faster than oneDNN (the two timed in turn, best of three), else None."""
    with torch.inference_mode():
        layouts = {"panel": [PackedLinear.of(linear, products=kernel) for linear in linears],
                   "onednn": [PackedLinear.of(linear) for linear in linears]}
        generator = torch.Generator().manual_seed(PROBE_SEED)  # not the global RNG
        inputs = {(rows, width): torch.randn(rows, width, generator=generator)
                  for rows in PROBE_ROWS for width in {linear.in_features for linear in linears}}
        seconds = dict.fromkeys(layouts, math.inf)
        for _ in range(3):
            for name, packed in layouts.items():
                seconds[name] = min(seconds[name], _step_seconds(packed, linears, inputs))
    chosen = seconds["panel"] < seconds["onednn"]
    megabytes = sum(linear.weight.numel() for linear in linears) * 4 / 1e6
    log.info("batched products: %s (%d linear layers, %.0f MB, at %s rows, in total: the panel kernel %.1f ms, "
             "oneDNN %.1f ms)", "the panel kernel" if chosen else "oneDNN's", len(linears), megabytes,
             ", ".join(map(str, PROBE_ROWS)), seconds["panel"] * 1e3, seconds["onednn"] * 1e3)
    return kernel if chosen else None


def _step_seconds(packed: list[PackedLinear], linears: list[torch.nn.Linear],
                  inputs: dict[tuple[int, int], torch.Tensor]) -> float:
    started = time.perf_counter()
    for rows in PROBE_ROWS:
        for layer, linear in zip(packed, linears):
            layer(inputs[rows, linear.in_features])
    return time.perf_counter() - started
