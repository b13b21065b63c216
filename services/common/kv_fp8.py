"""fp8 KV on the wire (`--kv-wire-encoding fp8`): float8 e4m3 with one float32 scale per
(layer, key/value, kv head) of a chunk, computed from that slice's absolute maximum, so a head
with small values keeps its precision next to one with large values. A chunk's data is one byte
per element ([layers, 2, kv_heads, tokens, head_dim], C order); its scales are little-endian
float32 in (layer, key/value, kv head) order. The receiver multiplies back and converts to its
pool dtype. Lossy (3 mantissa bits): the default encoding stays raw, which is exact.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from services.common.errors import KvCorrupted, KvProtocolError

FP8_ENCODING = "fp8"
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448; e4m3fn has no infinity, overflow would be NaN
SCALE_WIRE_DTYPE = np.dtype("<f4")
_SMALLEST_SCALE = float(torch.finfo(torch.float32).tiny)  # a scale is always > 0


def scale_count(shape: tuple[int, ...]) -> int:
    """Scales of a chunk of `shape` [layers, 2, kv_heads, tokens, head_dim]."""
    return shape[0] * shape[1] * shape[2]


def quantize(kv: torch.Tensor, what: str) -> tuple[bytes, bytes]:
    """(fp8 bytes, scale bytes) of `kv` [layers, 2, kv_heads, tokens, head_dim]. Raises KvCorrupted
    when a value is not finite: fp8 cannot carry it (`what` names the chunk in the message)."""
    x = kv.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise KvCorrupted(f"{what} holds values that are not finite (NaN or infinity); "
                          "they cannot be encoded as fp8, the transfer is refused")
    amax = x.abs().amax(dim=(3, 4), keepdim=True)
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).clamp_min(_SMALLEST_SCALE)
    # Rounding in the division may land a hair above 448, which e4m3fn would turn into NaN.
    encoded = (x / scales).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    data = encoded.contiguous().view(torch.uint8).numpy().tobytes()
    return data, scales.reshape(-1).numpy().astype(SCALE_WIRE_DTYPE).tobytes()


def check_scale_bytes(scales: bytes, shape: tuple[int, ...], what: str) -> None:
    """The scales have the length `shape` needs (checked before the checksum, like data's length)."""
    expected = scale_count(shape) * SCALE_WIRE_DTYPE.itemsize
    if len(scales) != expected:
        raise KvProtocolError(f"{what} carries {len(scales)} bytes of fp8 scales, its shape needs {expected} "
                              f"({scale_count(shape)} float32)")


def check_scales(scales: bytes, what: str) -> np.ndarray:
    """The scales as float32, each a finite number > 0 (else KvCorrupted: the values would be garbage
    or of the wrong sign)."""
    factors = np.frombuffer(scales, dtype=SCALE_WIRE_DTYPE).astype(np.float32)
    if not bool((np.isfinite(factors) & (factors > 0)).all()):
        raise KvCorrupted(f"{what} has an fp8 scale that is not a finite number > 0")
    return factors


def dequantize(data: bytes | memoryview, scales: bytes, shape: tuple[int, ...], dtype: torch.dtype,
               what: str) -> torch.Tensor:
    """The chunk's values in `dtype`, from checksum-verified fp8 bytes and scales. Raises KvCorrupted
    for a scale that is not finite and > 0 (the values would be garbage or of the wrong sign)."""
    factors = torch.from_numpy(check_scales(scales, what))
    with warnings.catch_warnings():  # frombuffer warns on read-only bytes; we only read them
        warnings.simplefilter("ignore", UserWarning)
        encoded = torch.frombuffer(data, dtype=torch.uint8).view(FP8_DTYPE).view(shape)
    layers, pair, heads = shape[0], shape[1], shape[2]
    return (encoded.to(torch.float32) * factors.view(layers, pair, heads, 1, 1)).to(dtype)


def wire_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of a chunk's data and scales on the wire."""
    return math.prod(shape) + scale_count(shape) * SCALE_WIRE_DTYPE.itemsize
