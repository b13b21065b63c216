"""Batched decode attention in C, over the blocks where they lie (paged_attention.c).

Torch's own primitives cannot attend over a paged pool without first copying every sequence's
blocks out of it: the batched step gathered each layer's keys and values with `index_select` and
ran SDPA over the copy. Measured on the development machine (8 sequences of ~200 tokens, 30
layers, one thread): gather 2.4 ms + SDPA 7.3 ms a step; grouped-query SDPA, `bmm` and a masked
softmax by hand were no faster. The kernel reads each block in place: ~3 ms for the same step.

It is compiled on the machine that runs it, at the worker's start, by the C compiler there (`$CC`,
else `cc`; well under a second), for the model's head size, into the model cache directory under a
name that hashes the source, the flags and the CPU, so a changed source or another CPU builds anew.
`--paged-attention auto` falls back to torch's SDPA path, with a log line, where it cannot be used:
no compiler, a device other than the CPU, a dtype other than float32, a head size that is not a
multiple of 8, or more than 16 query heads per kv head.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import cast

import torch
from transformers import PretrainedConfig

from services.common.errors import InternalFailure
from services.common.runtime import DTYPES, ModelRuntime

log = logging.getLogger(__name__)

MODES = ("auto", "native", "sdpa")
SOURCE = Path(__file__).with_name("paged_attention.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
BUILD_SECONDS = 120.0
MAX_GROUP = 16  # query heads per kv head the kernel takes (MAX_GROUP in the source)
_REFUSALS = {-1: "out of memory", -2: "a sequence length outside its block table",
             -3: "a block outside the pool", -4: "a shape it does not support"}


class NativeAttention:
    """The compiled kernel for one head size."""

    def __init__(self, library: ctypes.CDLL, head_dim: int) -> None:
        self.head_dim = head_dim
        self._kernel = library.paged_decode_attention
        self._kernel.restype = ctypes.c_int
        self._kernel.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_float]

    @staticmethod
    def build(runtime: ModelRuntime, cache_dir: Path, mode: str) -> NativeAttention | None:
        """The kernel for this model (`mode` auto: None where it cannot be used, logged; native:
        raise instead; sdpa: None)."""
        if mode not in MODES:
            raise ValueError(f"paged_attention must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "sdpa":
            return None
        geometry, config = runtime.geometry, cast(PretrainedConfig, runtime.model.config)
        head_dim = geometry.head_dim
        built = (_unsupported(head_dim, config.num_attention_heads, geometry.num_kv_heads, DTYPES[geometry.dtype],
                              runtime.device) or _compiled(head_dim, cache_dir))
        if isinstance(built, ctypes.CDLL):
            log.info("paged attention: the C kernel (%s)", built._name)
            return NativeAttention(built, head_dim)
        reason = built
        if mode == "native":
            raise ValueError(f"--paged-attention native cannot be used here: {reason}")
        log.info("paged attention: torch SDPA over gathered blocks (the C kernel cannot be used: %s)", reason)
        return None

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
               lengths: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention [batch, heads, 1, head_dim] of `query` [batch, heads, 1, head_dim] over the
        pool layer `keys`/`values` [blocks, block_size, kv_heads, head_dim]; `tables` [batch, width]
        and `lengths` [batch] are int64 (each sequence's blocks, and tokens including the new one)."""
        query = query.contiguous()
        _check_layout(query, keys, values, tables, lengths, self.head_dim)
        output = torch.empty_like(query)
        batch, heads = query.shape[0], query.shape[1]
        blocks, block_size, kv_heads, head_dim = keys.shape
        status = self._kernel(query.data_ptr(), keys.data_ptr(), values.data_ptr(), tables.data_ptr(),
                              lengths.data_ptr(), output.data_ptr(), batch, heads, kv_heads, head_dim, block_size,
                              tables.shape[1], blocks, scale)
        if status:
            raise InternalFailure(f"paged attention kernel refused its inputs: {_REFUSALS.get(status, status)}")
        return output


def _check_layout(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                  lengths: torch.Tensor, head_dim: int) -> None:
    """The kernel trusts its pointers: everything it reads and writes is checked here first (the
    block numbers and lengths themselves are checked by the kernel)."""
    tensors = (query, keys, values, tables, lengths)
    batch = query.shape[0]
    if not (all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and query.dtype == keys.dtype == values.dtype == torch.float32
            and tables.dtype == lengths.dtype == torch.int64
            and keys.dim() == 4 and values.shape == keys.shape and keys.shape[3] == head_dim
            and query.dim() == 4 and query.shape[2] == 1 and query.shape[3] == head_dim
            and tables.dim() == 2 and tables.shape[0] == batch and lengths.shape == (batch,)):
        raise InternalFailure("paged attention kernel: its inputs are not laid out as it reads them")


def _unsupported(head_dim: int, heads: int, kv_heads: int, dtype: torch.dtype, device: torch.device) -> str:
    if device.type != "cpu":
        return f"device {device.type} (the kernel is for the CPU)"
    if dtype != torch.float32:
        return f"dtype {dtype} (the kernel is float32)"
    if head_dim % 8:
        return f"head size {head_dim} is not a multiple of 8"
    if kv_heads < 1 or heads % kv_heads or heads // kv_heads > MAX_GROUP:
        return f"{heads} query heads over {kv_heads} kv heads"
    return ""


def _compiled(head_dim: int, cache_dir: Path) -> ctypes.CDLL | str:
    """The loaded library, built first unless the cache holds it (one that cannot be loaded, cut
    short by a crash, is built again); a string says why not."""
    compiler = shlex.split(os.environ.get("CC", "cc")) or ["cc"]  # `ccache gcc` works too
    found = shutil.which(compiler[0])
    if found is None:
        return f"no C compiler ({compiler[0]!r} is not on PATH)"
    command = [found, *compiler[1:], *FLAGS, f"-DHEAD_DIM={head_dim}"]
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(command).encode(), _cpu_identity()]))
    target = cache_dir / "native" / f"paged_attention-d{head_dim}-{key.hexdigest()[:16]}.so"
    try:
        if target.exists():
            try:
                return ctypes.CDLL(str(target))
            except OSError as error:
                log.warning("rebuilding %s, which cannot be loaded: %s", target, error)
        _build(command, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        return f"building it failed: {error}"


def _build(command: list[str], target: Path) -> None:
    """Compile into a temporary file beside `target`, then rename: workers starting at once never
    load a half-written library, and a crash leaves none under the final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(descriptor)
    try:
        done = subprocess.run([*command, "-o", partial, str(SOURCE)], capture_output=True, text=True,
                              timeout=BUILD_SECONDS, check=False)
        if done.returncode:
            raise OSError(f"{command[0]} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(partial, 0o755)  # mkstemp's 0600: other users sharing the cache load it too
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _cpu_identity() -> bytes:
    """What -march=native compiles for: the CPU's model and flags (a library built for one CPU may
    not run on another)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    lines = [line for line in text.splitlines()
             if line.lower().startswith(("model name", "flags", "features", "cpu part", "vendor_id"))]
    return "\n".join([platform.machine(), platform.processor(), *sorted(set(lines))]).encode()
