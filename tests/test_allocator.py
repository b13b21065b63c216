"""glibc's malloc thresholds (services.common.allocator): set in a fresh process, so that a block
of megabytes comes from the heap, not from a fresh mapping; left alone where the operator set them."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# Prints whether tune_allocator set the thresholds, then how many blocks malloc mapped on their
# own (mallinfo2's hblks) for a 16 MB allocation: glibc's default maps any block over 128 KB.
_PROBE = """
import ctypes
from services.common.allocator import tune_allocator
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
print(tune_allocator())
before = libc.mallinfo2().hblks
block = libc.malloc(16 * 1024 * 1024)
print(libc.mallinfo2().hblks - before)
"""
_LIBC, _VERSION = platform.libc_ver()
pytestmark = pytest.mark.skipif(_LIBC != "glibc" or tuple(map(int, _VERSION.split(".")[:2])) < (2, 33),
                                reason="glibc's mallopt and mallinfo2")


def _probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True,
                          timeout=60, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return done.stdout.split()


def test_a_block_of_megabytes_comes_from_the_heap_once_tuned() -> None:
    assert _probe() == ["True", "0"]


def test_an_unrelated_glibc_tunable_does_not_stop_it() -> None:
    assert _probe(GLIBC_TUNABLES="glibc.pthread.rseq=0") == ["True", "0"]


@pytest.mark.parametrize("setting", ["GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"])
def test_an_operators_malloc_setting_wins(setting: str) -> None:
    value = "glibc.malloc.check=0" if setting == "GLIBC_TUNABLES" else "1048576"
    assert _probe(**{setting: value}) == ["False", "1"]  # glibc's own rules: 16 MB is mapped on its own
