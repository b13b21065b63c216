"""glibc's malloc, set for a process that moves messages of megabytes (every service calls
`tune_allocator` at start).

gRPC hands each received message to Python as a new bytes object, and the prefill builds one per
KV chunk: ~3 MB each, 32 of them for a 2,048-token prompt of the default model. By default glibc
moves its mmap threshold and gives the free top of its heap back to the kernel as it goes, so a
stream of such blocks keeps taking fresh pages, a page fault per 4 KB (the bare gRPC stream of a
transfer's 94 MB measured 45-85 ms on a 2-core AMD EPYC, 33-42 ms with fixed thresholds). Fixed
thresholds keep blocks up to 32 MB on the heap and up to 64 MB of it free for the next ones.
Settings the operator gave glibc's malloc (MALLOC_*_ variables, glibc.malloc tunables in
GLIBC_TUNABLES) win; other C libraries are left alone."""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest on 64-bit systems
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024
_OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def tune_allocator() -> bool:
    """Set glibc's thresholds (once per process, before the big messages); False where it left
    the allocator as it was (not glibc, or the operator set it)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(name in os.environ for name in _OPERATOR_SETTINGS) or "glibc.malloc." in tunables:
        log.info("malloc left as the operator set it")
        return False
    libc = ctypes.CDLL(None)
    done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and libc.mallopt(M_TRIM_THRESHOLD,
                                                                                 TRIM_THRESHOLD_BYTES)
    if not done:
        log.warning("glibc refused the allocator's thresholds: left as they were")
    return bool(done)
