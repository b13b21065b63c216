"""The exact gemv kernel for tests (test_exact_gemv.py, test_one_stream.py): built, its products
counted, and a mark for the tests that need this machine's BLAS to sum in the order it reproduces."""

from __future__ import annotations

import os

import pytest
import torch

from services.common.model_files import default_cache_dir
from services.decode.exact_gemv import ExactGemv


def built_kernel(hint: str | None = None) -> ExactGemv:
    kernel = ExactGemv.build(default_cache_dir()) if hint is None else ExactGemv.build(default_cache_dir(), hint)
    assert isinstance(kernel, ExactGemv)
    return kernel


def counted(kernel: ExactGemv) -> list[int]:
    """A list that grows by one at each of the kernel's products from now on."""
    calls: list[int] = []
    run = kernel.run  # every product goes through it

    def counting(weight: tuple[int, int, int, int], x: int, out: int) -> None:
        calls.append(1)
        run(weight, x, out)
    kernel.run = counting  # type: ignore[method-assign]
    return calls


def blas_order_unknown() -> str:
    """Why the kernel cannot match here (empty where it does): no compiler, or a BLAS that sums in
    another order than the one the kernel reproduces (MKL's path on AMD EPYC, the machine CI runs on)."""
    kernel = ExactGemv.build(default_cache_dir())
    if isinstance(kernel, str):
        return kernel
    probe = torch.randn(64, 576, generator=torch.Generator().manual_seed(1))
    return "" if kernel.agrees(probe) else "this machine's BLAS sums one-row products in another order"


needs_the_blas_order = pytest.mark.skipif(bool(blas_order_unknown()), reason=blas_order_unknown() or "-")


needs_a_second_core = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="a gemv helper needs a second core")
