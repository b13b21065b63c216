"""The gRPC fp8 row of `make bench-transfer`: the same prompt's KV encoded as the prefill does with
`--kv-wire-encoding fp8` (one byte a value plus a float32 scale per layer, key/value, kv head and
chunk), streamed into the same decode worker, which verifies, dequantizes and stores every chunk.
Two rates: wire bytes per second, and the KV cache's own bytes (in the model dtype) delivered per
second, which is what a transfer is for."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from services.common.kv_codec import FP8_ENCODING, KvEnd, KvLayout, encode_chunk
from services.common.kv_wire import to_pb
from services.common.pb import kv_pb2
from services.common.runtime import ModelRuntime


@dataclass(frozen=True, slots=True)
class Fp8Transfer:
    messages: list[kv_pb2.KvTransferMessage]
    wire_bytes: int  # chunk data + scales
    encode_seconds: float  # quantizing the whole KV at the prefill (not part of the transfer time)


@dataclass(frozen=True, slots=True)
class Fp8Row:
    wire_bytes: int
    chunk_count: int
    encode_seconds: float
    seconds: float
    wire_gbps: float
    kv_gbps: float  # the raw KV bytes this transfer delivers, per second


def fp8_transfer(runtime: ModelRuntime, prompt: list[int], request_id: str, chunk_tokens: int,
                 chunk_layers: int) -> Fp8Transfer:
    """The prompt's real KV as the messages of one fp8 transfer."""
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    runtime.prefill(prompt, lambda index, k, v: layers.__setitem__(index, (k, v)))
    g = runtime.geometry
    layout = KvLayout(request_id, g.fingerprint, g.num_layers, g.num_kv_heads, g.head_dim, len(prompt),
                      chunk_tokens, chunk_layers, g.dtype, FP8_ENCODING)
    started, chunks = time.perf_counter(), []
    for group in range(layout.layer_groups):
        members = range(group * chunk_layers, min((group + 1) * chunk_layers, g.num_layers))
        keys, values = torch.stack([layers[i][0] for i in members]), torch.stack([layers[i][1] for i in members])
        chunks += [encode_chunk(layout, i, keys, values) for i in layout.group_chunks(group)]
    encode_seconds = time.perf_counter() - started
    messages = [to_pb(layout), *(to_pb(c) for c in chunks), to_pb(KvEnd(request_id, layout.chunk_count, 0))]
    return Fp8Transfer(messages, sum(len(c.data) + len(c.scales) for c in chunks), encode_seconds)


def fp8_row(transfer: Fp8Transfer, times: list[float], raw_kv_bytes: int) -> Fp8Row:
    best = min(times)
    chunks = sum(1 for m in transfer.messages if m.HasField("chunk"))
    return Fp8Row(transfer.wire_bytes, chunks, transfer.encode_seconds, best, transfer.wire_bytes / best / 1e9,
                  raw_kv_bytes / best / 1e9)


def format_fp8_row(row: Fp8Row, raw_grpc_seconds: float, repeats: int) -> str:
    return (f"  gRPC TransferKv fp8   {row.seconds * 1e3:8.1f} ms  {row.wire_gbps:6.2f} GB/s   (best of {repeats}; "
            f"{row.wire_bytes:,} wire bytes in {row.chunk_count} chunks; {row.kv_gbps:.2f} GB/s of KV delivered, "
            f"{raw_grpc_seconds / row.seconds:.2f}x the raw stream's speed; quantizing took "
            f"{row.encode_seconds * 1e3:.0f} ms at the prefill)")
