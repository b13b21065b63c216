"""Batched decode attention in C, over the blocks where they lie (paged_attention.c).

Torch's own primitives cannot attend over a paged pool without first copying every sequence's
blocks out of it: the batched step gathered each layer's keys and values with `index_select` and
ran SDPA over the copy. Measured on the development machine (8 sequences of ~200 tokens, 30
layers, one thread): gather 2.4 ms + SDPA 7.3 ms a step; grouped-query SDPA, `bmm` and a masked
softmax by hand were no faster. The kernel reads each block in place: ~3 ms for the same step.

It is compiled on the machine that runs it, at the worker's start, for the model's head size
(services.common.native_build).
`--paged-attention auto` falls back to torch's SDPA path, with a log line, where it cannot be used:
no compiler, a device other than the CPU, a dtype other than float32, a head size that is not a
multiple of 8, or more than 16 query heads per kv head.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import cast

import torch
from transformers import PretrainedConfig

from services.common.errors import InternalFailure
from services.common.native_build import compiled
from services.common.runtime import DTYPES, ModelRuntime

log = logging.getLogger(__name__)

MODES = ("auto", "native", "sdpa")
SOURCE = Path(__file__).with_name("paged_attention.c")
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
                              runtime.device)
                 or compiled(SOURCE, f"paged_attention-d{head_dim}", [f"HEAD_DIM={head_dim}"], cache_dir))
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
