"""Idle cores helping a batch of one's products (exact_gemv.c's shared_gemv): why, and the rules.

A stream decoding alone is bound by how fast its one thread reads the weights, and one core
cannot read memory as fast as two: on a 2-core Zen box a plain sum reads 13 GB/s on one core and
23 on both, and the exact gemv kernel's products for a whole token (538 MB) took 46 ms alone and
31 with a helper on the other core (best of 10, six alternating rounds). `make up` gives the
other core to the prefill, which is idle between prompts; vLLM's CPU build leaves it to its
front end.

So the decode may run helper threads on cores it does not own: each pinned to one core at
SCHED_IDLE, the kernel's lowest policy, which runs only when nothing else on that core wants it.
A prefill working there takes its core back at once (the helper's claimed rows are then computed
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
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Sequence

import torch

from services.common.errors import InternalFailure
from services.common.placement import parse_cpu_list

MAX_HELPERS = 8  # exact_gemv.c's
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
    """Helper threads for the exact gemv kernel's products on a fixed set of weights; stopped
    (their threads joined) when this object is collected, or at exit."""

    def __init__(self, library: ctypes.CDLL, pool: int, cores: Sequence[int], weights: Sequence[torch.Tensor]) -> None:
        self.cores = tuple(cores)
        self._run = library.shared_gemv_run
        self._counts = library.shared_gemv_counts
        self._pool = pool
        self._addresses = frozenset(weight.data_ptr() for weight in weights)  # the only weights helpers may read
        # the helpers may read any of these weights until joined: hold their storages until then
        storages = [weight.untyped_storage() for weight in weights]
        self._stop = weakref.finalize(self, _stop, library, pool, storages)

    @staticmethod
    def start(library: ctypes.CDLL, cores: Sequence[int], weights: Sequence[torch.Tensor]) -> GemvHelpers | str:
        """Helpers on `cores` for products on `weights` ([rows, columns] float32), or why not."""
        if not cores or not weights:
            return "no cores or no weights to help with"
        if len(cores) > MAX_HELPERS:
            return f"at most {MAX_HELPERS} helpers"
        _declare(library)
        rows, columns = max(weight.shape[0] for weight in weights), max(weight.shape[1] for weight in weights)
        pool = library.shared_gemv_start((ctypes.c_int * len(cores))(*cores), len(cores), rows, columns)
        if not pool:
            return f"the helpers could not start on cores {list(cores)} (a core outside this container, or memory)"
        return GemvHelpers(library, pool, cores, weights)

    def run(self, weight: tuple[int, int, int, int], x: int, out: int) -> None:
        """exact_gemv's `run` (same arguments), helped; the weight must be one of the pool's (a helper
        may still read it after the product, while it loses the race for a block)."""
        if weight[0] not in self._addresses:
            raise InternalFailure("gemv helpers: a weight they were not started for")
        if self._run(self._pool, weight[0], x, out, *weight[1:]):
            raise InternalFailure("exact gemv kernel refused a weight it had been checked for")

    def counts(self) -> tuple[int, int, int]:
        """Blocks of the helpers' parts of products so far (computed by a helper, by the caller), and
        how many times the caller computed alone for a while, the helpers having done too little."""
        helped, taken, rests = ctypes.c_int64(), ctypes.c_int64(), ctypes.c_int64()
        self._counts(self._pool, ctypes.byref(helped), ctypes.byref(taken), ctypes.byref(rests))
        return helped.value, taken.value, rests.value

    def stop(self) -> None:
        self._stop()


def _declare(library: ctypes.CDLL) -> None:
    library.shared_gemv_start.restype = ctypes.c_void_p
    library.shared_gemv_start.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    library.shared_gemv_run.restype = ctypes.c_int
    library.shared_gemv_run.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    library.shared_gemv_counts.restype = None
    library.shared_gemv_counts.argtypes = [ctypes.c_void_p] * 4
    library.shared_gemv_stop.restype = None
    library.shared_gemv_stop.argtypes = [ctypes.c_void_p]


def _stop(library: ctypes.CDLL, pool: int, storages: list[torch.UntypedStorage]) -> None:
    library.shared_gemv_stop(pool)  # joins the threads: only then may the weights go
    storages.clear()

