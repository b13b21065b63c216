"""CPU placement of a model worker: which cores it runs on and how many intra-op threads torch uses.

Two workers whose OpenMP threads share cores slow each other down several times over: an OpenMP
parallel region ends at a barrier, and a thread preempted by another process's thread holds every
other thread of the region at that barrier (spinning, under the default wait policy). So `make up`
gives prefill and decode disjoint halves of the cores (`first-half` / `second-half`), each worker
runs one intra-op thread per core it owns and never more, and OpenMP threads wait passively
(`OMP_WAIT_POLICY=PASSIVE`, set by the launcher: it must be in the environment before torch loads).

Half precision: bfloat16 and float16 matrix products on a CPU without native support for them
(AVX512-BF16/AMX, AVX512-FP16) are converted in software (vLLM's bfloat16 run on a Zen3 box was 5x
slower than its float32); a worker asked for one on such a CPU measures a matrix product in it
against float32 and warns with the figure.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads lazily: the launcher (services.stack) validates placements without it
    import torch

log = logging.getLogger(__name__)

HALVES = ("first-half", "second-half")
WAIT_POLICIES = ("", "PASSIVE", "ACTIVE")
NATIVE_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}


def parse_cpu_list(spec: str) -> frozenset[int]:
    """'0-3,6' -> {0, 1, 2, 3, 6}. Raises ValueError."""
    cpus: set[int] = set()
    for part in (piece.strip() for piece in spec.split(",")):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"cpu list {spec!r}: use numbers and ranges such as 0-3,6")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ValueError(f"cpu list {spec!r}: range {part} runs backwards")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def check_cpus(spec: str) -> None:
    """Validate a `cpus` setting: '' (all), 'first-half', 'second-half' or a cpu list."""
    if spec and spec not in HALVES:
        parse_cpu_list(spec)


def check_wait_policy(policy: str) -> None:
    if policy.upper() not in WAIT_POLICIES:
        raise ValueError(f"OpenMP wait policy must be one of {WAIT_POLICIES}, got {policy!r}")


def allowed_cpus() -> frozenset[int]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def resolve_cpus(spec: str, allowed: frozenset[int]) -> frozenset[int]:
    """The cores a `cpus` setting names among `allowed`: a half takes ceil(n/2) of them first (the
    decode's, which the token latency depends on) and the rest second; on one core both halves are
    that core. Raises ValueError for cores the process may not use."""
    ordered = sorted(allowed)
    if not spec:
        return allowed
    if spec in HALVES:
        cut = -(-len(ordered) // 2)
        chosen = ordered[:cut] if spec == HALVES[0] else ordered[cut:]
        return frozenset(chosen or ordered)
    cpus = parse_cpu_list(spec)
    if not cpus <= allowed:
        raise ValueError(f"cpus {spec!r}: this process may only use {sorted(allowed)}")
    return cpus


def thread_count(requested: int, cpus: frozenset[int]) -> int:
    """One thread per owned core unless fewer are asked for; never more threads than cores."""
    if requested > len(cpus):
        log.warning("torch_threads %d > the %d cores this worker runs on: using %d (more would oversubscribe)",
                    requested, len(cpus), len(cpus))
    return min(requested, len(cpus)) if requested else len(cpus)


def apply(spec: str, requested_threads: int) -> tuple[frozenset[int], int]:
    """Pin every thread of this process to its cores (where the platform allows) and set torch's
    intra-op thread count. Call before the model's first forward pass."""
    cpus = resolve_cpus(spec, allowed_cpus())
    if spec and hasattr(os, "sched_setaffinity"):
        for task in Path("/proc/self/task").iterdir():  # every thread: the model thread, gRPC's, the loop's
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except ProcessLookupError:  # a thread that just ended
                continue
    import torch

    threads = thread_count(requested_threads, cpus)
    torch.set_num_threads(threads)
    log.info("placement: cores %s, %d torch threads, OMP_WAIT_POLICY=%s", sorted(cpus), threads,
             os.environ.get("OMP_WAIT_POLICY", "(default)"))
    return cpus, threads


def native_half(dtype: torch.dtype) -> bool:
    """Whether this CPU computes `dtype` matrix products natively (float32 always does)."""
    flags = NATIVE_FLAGS.get(str(dtype).removeprefix("torch."))
    if flags is None:
        return True
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    present = set(cpuinfo.split())
    return any(flag in present for flag in flags)


def half_slowdown(dtype: torch.dtype, size: int = 576, repeats: int = 20) -> float:
    """Measured time of a decode-shaped matrix-vector product in `dtype` over float32's."""
    import torch

    timings = []
    for kind in (torch.float32, dtype):
        weight, row = torch.randn(size * 4, size, dtype=kind), torch.randn(1, size, dtype=kind)
        torch.nn.functional.linear(row, weight)
        started = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.linear(row, weight)
        timings.append(time.perf_counter() - started)
    return timings[1] / timings[0]


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Warn, with the measured slowdown, about a half dtype this CPU has no native support for."""
    if device.type != "cpu" or native_half(dtype):
        return
    name = str(dtype).removeprefix("torch.")
    log.warning("%s on a CPU without native %s support (%s): it is converted in software; a decode-shaped matrix "
                "product measured %.2fx the time of float32 here, and other kernels may fall further behind; "
                "use --dtype float32", name, name, " or ".join(NATIVE_FLAGS[name]), half_slowdown(dtype))
