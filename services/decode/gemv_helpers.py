"""Idle cores helping a decode's products (exact_gemv.c's shared_gemv): why, and the rules.

A stream decoding alone is bound by how fast its one thread reads the weights, and one core
cannot read memory as fast as two: on a 2-core Zen box a plain sum reads 13 GB/s on one core and
23 on both, and the exact gemv kernel's products for a whole token (538 MB) took 46 ms alone and
31 with a helper on the other core (best of 10, six alternating rounds). `make up` gives the
other core to the prefill, which is idle between prompts; vLLM's CPU build leaves it to its
front end.

So the decode may run helper threads on cores it does not own: each pinned to one core at
SCHED_IDLE, the kernel's lowest policy, which runs only when nothing else on that core wants it.
A prefill working there takes its core back at once (the helper's claimed blocks are then computed
by the decode itself: the decode never waits for a helper), so the placement's promise holds for
CPU time: the decode's other threads stay on its own cores, and a helper only takes time the
prefill's core would spend idle. A helper spins for 2 ms after each product (a step's next one
comes within microseconds) and then sleeps on a futex. While its core stays busy, the decode
computes alone for a while (exact_gemv.c's `judge`) instead of waking it for nothing.

Every row is summed by the same code whichever thread takes it, so the products keep their bits
(tests/test_gemv_helpers.py checks them against F.linear with a helper's core idle, busy, and
shared so that helpers are preempted mid-block all the time). Helpers read only the weights the
pool was started for (another is refused), which it keeps alive (their storages) until its
threads are joined.

Batched steps are helped the same way (`shared_panels_run`: blocks of a panel product's output
columns, panel_products.py). On one core their products are bound by its arithmetic on some CPUs:
on a 2-core Zen 4 (AVX-512 on 256-bit units) a 32-row step's products took 88 ms on one thread and
51 split over two (a scratch split of every layer's panels). Rows beyond HELPED_ROWS (a decode's
own prefill of a long prompt) are computed alone: each helper's scratch holds HELPED_ROWS rows of
the widest output (the LM head's).
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from collections.abc import Callable, Sequence

import torch

from services.common.errors import InternalFailure
from services.common.placement import parse_cpu_list

MAX_HELPERS = 8  # exact_gemv.c's
HELPED_ROWS = 64  # the most input rows a helped product has (its scratch: rows x the widest output)
AUTO_HELPERS = 3  # beyond a few cores a single stream's reads stop scaling, and each helper spins
SETTINGS_HELP = ("auto (one helper on each core this worker's placement leaves to others, up to 3), off, or a "
                 "cpu list")


def check_setting(value: str) -> None:
    """Validate a `gemv_helpers` setting: auto, off or a cpu list. Raises ValueError."""
    if value not in ("auto", "off"):
        try:
            cores = parse_cpu_list(value)
        except ValueError as error:
            raise ValueError(f"gemv_helpers must be auto, off or a cpu list: {error}") from None
        if len(cores) > MAX_HELPERS:
            raise ValueError(f"gemv_helpers must be auto, off or a cpu list of at most {MAX_HELPERS} cores, "
                             f"got {len(cores)}")


def helper_cores(setting: str, spare: frozenset[int]) -> list[int]:
    """The cores a `gemv_helpers` setting names, `spare` being those the worker's placement took
    from the cores it was started on (none without a placement: it owns them all)."""
    if setting == "off":
        return []
    if setting == "auto":
        return sorted(spare)[:AUTO_HELPERS]
    return sorted(parse_cpu_list(setting))


class GemvHelpers:
    """Helper threads for the exact gemv kernel's products on a fixed set of weights, and for the
    panel kernel's on a fixed set of panels; stopped (their threads joined) when this object is
    collected, or at exit."""

    def __init__(self, library: ctypes.CDLL, pool: int, cores: Sequence[int], weights: Sequence[torch.Tensor],
                 panels: Sequence[torch.Tensor]) -> None:
        self.cores = tuple(cores)
        self._run: Callable[..., int] = library.shared_gemv_run
        self._panels_run: Callable[..., int] = library.shared_panels_run
        self._counts = library.shared_gemv_counts
        self._pool = pool
        self._addresses = frozenset(weight.data_ptr() for weight in weights)  # the only weights helpers may read
        self._panel_storages = frozenset(panel.untyped_storage().data_ptr() for panel in panels)  # and panels
        # the helpers may read any of these until joined: hold their storages until then
        storages = [tensor.untyped_storage() for tensor in (*weights, *panels)]
        self._freeing = threading.Lock()  # `counts` (a metrics scrape's thread) never reads a freed pool
        self._stop = weakref.finalize(self, _stop, library, pool, storages, self._freeing)
        self._last = (0, 0, 0)  # what `counts` read last

    @staticmethod
    def start(library: ctypes.CDLL, cores: Sequence[int], weights: Sequence[torch.Tensor],
              panels: Sequence[torch.Tensor] = ()) -> GemvHelpers | str:
        """Helpers on `cores` for products on `weights` ([rows, columns] float32) and on `panels`
        (a panel kernel's packed weights, [panels, columns, width] float32), or why not."""
        if not cores or not (weights or panels):
            return "no cores or no weights to help with"
        if len(cores) > MAX_HELPERS:
            return f"at most {MAX_HELPERS} helpers"
        _declare(library)
        shapes = [tuple(weight.shape) for weight in weights] + [(p.shape[0] * p.shape[2], p.shape[1]) for p in panels]
        rows, columns = max(shape[0] for shape in shapes), max(shape[1] for shape in shapes)
        pool = library.shared_gemv_start((ctypes.c_int * len(cores))(*cores), len(cores),
                                         HELPED_ROWS if panels else 1, rows, columns)
        if not pool:
            return f"the helpers could not start on cores {list(cores)} (a core outside this container, or memory)"
        return GemvHelpers(library, pool, cores, weights, panels)

    def run(self, weight: tuple[int, int, int, int], x: int, out: int) -> None:
        """exact_gemv's `run` (same arguments), helped; the weight must be one of the pool's (a helper
        may still read it after the product, while it loses the race for a block)."""
        if weight[0] not in self._addresses:
            raise InternalFailure("gemv helpers: a weight they were not started for")
        if self._run(self._pool, weight[0], x, out, *weight[1:]):
            raise InternalFailure("exact gemv kernel refused a weight it had been checked for")

    def covers(self, panels: torch.Tensor) -> bool:
        """Whether the helpers may read `panels`: one of those they were started for, or a view of one."""
        return panels.untyped_storage().data_ptr() in self._panel_storages

    def panels_run(self, columns: int, width: int, x: torch.Tensor, panels: torch.Tensor, out: torch.Tensor,
                   block: int) -> bool:
        """The panel kernel's product (`columns`: the address of its panel_gemm_columns, `width`
        its panel width) of the rows `x` [m, k] by `panels` into `out` [m, n], each sum over k in
        blocks of `block`, helped; all three checked by the caller (PanelKernel.product). False,
        computing nothing, where `panels` are neither the pool's nor a view of one (no helper may
        read them: the caller computes alone)."""
        if not self.covers(panels):
            return False
        m, k = x.shape
        if self._panels_run(self._pool, columns, width, x.data_ptr(), panels.data_ptr(), out.data_ptr(), m,
                            out.shape[1], k, block):
            raise InternalFailure("panel kernel refused its sizes")
        return True

    def counts(self) -> tuple[int, int, int]:
        """Blocks of the helpers' parts of products so far (computed by a helper, by the caller), and
        how many times the caller computed alone for a while, the helpers having done too little
        (read from any thread, e.g. a metrics scrape; the last counts once stopped)."""
        with self._freeing:
            if self._stop.alive:
                helped, taken, rests = ctypes.c_int64(), ctypes.c_int64(), ctypes.c_int64()
                self._counts(self._pool, ctypes.byref(helped), ctypes.byref(taken), ctypes.byref(rests))
                self._last = helped.value, taken.value, rests.value
            return self._last

    def stop(self) -> None:
        """Join the threads and free the pool (once a product in flight has ended); a product
        through it afterwards raises InternalFailure."""
        self.counts()
        self._run = self._panels_run = _stopped
        self._stop()


def _stopped(*_: object) -> int:
    raise InternalFailure("gemv helpers: used after they were stopped")


def _declare(library: ctypes.CDLL) -> None:
    library.shared_gemv_start.restype = ctypes.c_void_p
    library.shared_gemv_start.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_int64]
    library.shared_gemv_run.restype = ctypes.c_int
    library.shared_gemv_run.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    library.shared_panels_run.restype = ctypes.c_int
    library.shared_panels_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_int64, ctypes.c_int64]
    library.shared_gemv_counts.restype = None
    library.shared_gemv_counts.argtypes = [ctypes.c_void_p] * 4
    library.shared_gemv_stop.restype = None
    library.shared_gemv_stop.argtypes = [ctypes.c_void_p]


def _stop(library: ctypes.CDLL, pool: int, storages: list[torch.UntypedStorage], freeing: threading.Lock) -> None:
    with freeing:
        library.shared_gemv_stop(pool)  # joins the threads: only then may the weights go
    storages.clear()

