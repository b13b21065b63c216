"""`python -m services.bench.ingest`: the decode's receiving work for one transfer, in this process.

The same chunks (a 2,048-token prompt of the default model's geometry by default: 94 MB, 32 chunks
of 512 tokens x 4 layers; random values) are received into a paged pool through the real
KvAssembler and LeasedWriter, once with the Python passes (CRC-32C, min/max, transposing copy) and
once with the one native pass (`--kv-ingest native`), raw and fp8; next to a memcpy of the same
bytes into one buffer. Best of `--repeats`, one thread, the pool's pages touched beforehand.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import numpy
import torch

from services.common.kv_codec import FP8_ENCODING, RAW_ENCODING, KvChunk, KvLayout, encode_chunk
from services.common.kv_assembly import AssemblyLimits, KvAssembler
from services.common.kv_ingest import NativeIngest
from services.common.model_files import default_cache_dir
from services.common.runtime import ModelGeometry
from services.decode.blocks import BlockManager, LeasedWriter
from services.decode.pool import BlockPool, PoolConfig

BLOCK = 16


def chunks_of(geometry: ModelGeometry, tokens: int, chunk_tokens: int, chunk_layers: int,
              encoding: str) -> tuple[KvLayout, list[KvChunk]]:
    layout = KvLayout("bench", geometry.fingerprint, geometry.num_layers, geometry.num_kv_heads, geometry.head_dim,
                      tokens, chunk_tokens, chunk_layers, geometry.dtype, encoding)
    generator = torch.Generator().manual_seed(0)
    chunks = []
    for group in range(layout.layer_groups):
        layers = min(chunk_layers, geometry.num_layers - group * chunk_layers)
        keys, values = torch.randn(2, layers, geometry.num_kv_heads, tokens, geometry.head_dim, generator=generator)
        chunks += [encode_chunk(layout, index, keys, values) for index in layout.group_chunks(group)]
    return layout, chunks


def receive(geometry: ModelGeometry, pool: BlockPool, layout: KvLayout, chunks: list[KvChunk]) -> None:
    manager = BlockManager(PoolConfig(pool.keys[0].shape[0], BLOCK))
    writer = LeasedWriter(pool, manager, manager.allocate("bench", layout.num_tokens))
    assembler = KvAssembler("bench", geometry, layout.num_tokens, AssemblyLimits(1 << 30), writer)
    assembler.accept_layout(layout)
    for chunk in chunks:
        assembler.accept_chunk(chunk)
    assembler.check_complete()


def best_of(repeats: int, work: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.bench.ingest", description=__doc__)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--chunk-layers", type=int, default=4)
    parser.add_argument("--layers", type=int, default=30, help="the default model's geometry unless changed")
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    geometry = ModelGeometry("bench", "bench", "float32", args.layers, args.kv_heads, args.head_dim, args.tokens,
                             frozenset(), 1)
    native = NativeIngest.build(default_cache_dir(), "native")
    config = PoolConfig(-(-args.tokens // BLOCK), BLOCK)
    pools = {"python": BlockPool(config, geometry, torch.device("cpu")),
             "native": BlockPool(config, geometry, torch.device("cpu"), native)}
    print(f"receiving one transfer: {args.tokens} tokens, {args.layers} layers x {args.kv_heads} kv heads x "
          f"{args.head_dim}, chunks of {args.chunk_tokens} tokens x {args.chunk_layers} layers, best of {args.repeats}")
    raw: list[KvChunk] = []
    for encoding in (RAW_ENCODING, FP8_ENCODING):
        layout, chunks = chunks_of(geometry, args.tokens, args.chunk_tokens, args.chunk_layers, encoding)
        raw = raw or chunks
        wire = sum(len(c.data) + len(c.scales) for c in chunks)
        seconds = {name: best_of(args.repeats, functools.partial(receive, geometry, pool, layout, chunks))
                   for name, pool in pools.items()}
        print(f"  {encoding:4s} {wire:12,} bytes: Python passes {seconds['python'] * 1e3:7.1f} ms, one native pass "
              f"{seconds['native'] * 1e3:7.1f} ms ({seconds['python'] / seconds['native']:.1f}x)")
    target = numpy.empty(sum(len(chunk.data) for chunk in raw), numpy.uint8)

    def copy() -> None:
        offset = 0
        for chunk in raw:
            target[offset : offset + len(chunk.data)] = numpy.frombuffer(chunk.data, numpy.uint8)
            offset += len(chunk.data)

    print(f"  memcpy of the raw bytes into one buffer: {best_of(args.repeats, copy) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
