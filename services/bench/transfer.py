"""`make bench-transfer`: how fast a prompt's KV cache moves from prefill to decode.

For one long prompt on the served model (its real KV, computed once), it prints one table, every
row moving the same bytes in the same run: the gRPC TransferKv stream into a real decode worker
process (which verifies every chunk's checksum, shape, order and finiteness and writes it into its
paged pool; timed from the first write to the acknowledgement), raw loopback TCP to another process
that only reads, and a memcpy; each with its ratio to raw TCP and to memcpy (rows: transfer_rows.ROWS).
Then the handoff latency (forward end -> decode holds verified KV) through a real prefill worker per
transport, and the decode's inter-token latency with 8 streams while a transfer arrives every second
(handoff.py). `--quick` runs it all briefly on the tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import tempfile
from dataclasses import asdict

import grpc
import torch

from services.bench.handoff import (
    HANDOFF_TRANSPORTS,
    LOAD_SENDERS,
    Handoff,
    LoadResult,
    handoff_via_prefill,
    under_load,
)
from services.bench.transfer_rows import ROWS, Row, TransferCase
from services.bench.transfer_shm import PATH, shm_fp8, shm_raw
from services.common.allocator import tune_allocator
from services.common.kv_codec import FP8_ENCODING, RAW_ENCODING, ChunkSource, KvEnd, KvLayout
from services.common.kv_wire import KvMessage
from services.common.model_files import default_cache_dir
from services.common.pb import common_pb2, decode_pb2_grpc
from services.common.kv_shm import SHM_CHUNK_TOKENS
from services.common.runtime import ModelRuntime
from services.stack import ServiceSpec, Stack, free_port

PLACED = " and encoding its chunks into the segment"  # the shm raw row's setup
QUICK = {"model": "tiny", "prompt_tokens": 256, "chunk_tokens": 64, "shm_chunk_tokens": 128, "repeats": 2,
         "load_streams": 2, "load_seconds": 1.5}


def prompt_kv(runtime: ModelRuntime, prompt: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The prompt's real KV per layer, computed once."""
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    runtime.prefill(prompt, lambda index, k, v: layers.__setitem__(index, (k, v)))
    return layers


def build_transfer(runtime: ModelRuntime, layers: dict[int, tuple[torch.Tensor, torch.Tensor]], tokens: int,
                   chunk_tokens: int, chunk_layers: int, encodings: tuple[str, ...] = (RAW_ENCODING, FP8_ENCODING)
                   ) -> tuple[dict[str, list[KvMessage]], list[ChunkSource]]:
    """The messages of one transfer of the KV per wire encoding, and its raw chunks before encoding
    (what the prefill's shm sink encodes into its segment; empty without raw)."""
    g = runtime.geometry
    groups = [tuple(torch.stack([layers[i][part] for i in range(start, min(start + chunk_layers, g.num_layers))])
                    for part in (0, 1)) for start in range(0, g.num_layers, chunk_layers)]
    messages: dict[str, list[KvMessage]] = {}
    raw: list[ChunkSource] = []
    for encoding in encodings:
        layout = KvLayout("bench", g.fingerprint, g.num_layers, g.num_kv_heads, g.head_dim, tokens,
                          chunk_tokens, chunk_layers, g.dtype, encoding)
        sources = [ChunkSource(layout, i, keys, values)
                   for group, (keys, values) in enumerate(groups) for i in layout.group_chunks(group)]
        messages[encoding] = [layout, *(source.encode() for source in sources), KvEnd("bench", layout.chunk_count, 0)]
        raw = sources if encoding == RAW_ENCODING else raw
    return messages, raw


async def run(args: argparse.Namespace) -> dict[str, object]:
    runtime = ModelRuntime(args.model, "float32", "cpu", default_cache_dir())
    prompt = torch.randint(10, min(49000, runtime.geometry.vocab_size), (args.prompt_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    layers = prompt_kv(runtime, prompt)
    messages, _ = build_transfer(runtime, layers, len(prompt), args.chunk_tokens, args.chunk_layers)
    # Raw chunks through shm take --kv-shm-chunk-tokens; fp8 keeps --kv-chunk-tokens (its scales are per chunk).
    shm_messages, shm_sources = build_transfer(runtime, layers, len(prompt), args.shm_chunk_tokens, args.chunk_layers,
                                               (RAW_ENCODING,))
    del layers
    port = free_port()
    worker = ("--model", args.model, "--log-level", "WARNING", "--metrics-port", "0")
    # Without its prefix cache: every repeat of the same prompt must write all its chunks into the pool.
    decode = ServiceSpec("decode", "decode", port, ("--port", str(port), *worker, "--prefix-cache", "off"))
    stack = Stack([decode], log_dir=tempfile.mkdtemp(prefix="bench-transfer-"))
    stack.start()
    try:
        stack.wait_healthy(timeout=300)
        case = TransferCase(prompt, messages[RAW_ENCODING], decode.address, args.repeats, messages[FP8_ENCODING])
        shm_case = dataclasses.replace(case, messages=shm_messages[RAW_ENCODING], sources=shm_sources)
        rows = [await produce(case) for produce in ROWS]
        rows += [await shm_raw(shm_case), await shm_fp8(shm_case)]  # services.bench.transfer_shm
        prefill_args = (*worker, "--kv-chunk-tokens", str(args.chunk_tokens), "--kv-chunk-layers",
                        str(args.chunk_layers), "--kv-shm-chunk-tokens", str(args.shm_chunk_tokens))
        handoffs = [await handoff_via_prefill(case, name, prefill_args) for name in HANDOFF_TRANSPORTS]
        loads = [await under_load(shm_case if name.startswith("shm") else case, name, args.load_streams,
                                  args.load_seconds, args.load_interval) for name in LOAD_SENDERS]
        prefix_hit_tokens = await _prefix_hit_tokens(decode.address)
    finally:
        stack.stop()
    return {"model": args.model, "prompt_tokens": len(prompt), "chunk_tokens": args.chunk_tokens,
            "shm_chunk_tokens": args.shm_chunk_tokens,
            "chunk_layers": args.chunk_layers, "repeats": args.repeats, "rows": rows, "handoffs": handoffs,
            "under_load": loads, "decode_prefix_hit_tokens": prefix_hit_tokens}


async def _prefix_hit_tokens(decode_address: str) -> int:
    """Prompt tokens the decode took from its prefix cache instead of a transfer (0: every chunk landed)."""
    async with grpc.aio.insecure_channel(decode_address) as channel:
        stats = await decode_pb2_grpc.DecodeServiceStub(channel).Stats(common_pb2.StatsRequest(), timeout=30)
    return stats.prefix_hit_tokens


def table(report: dict[str, object]) -> str:
    rows: list[Row] = report["rows"]  # type: ignore[assignment]
    tcp = next(r for r in rows if r.path == "raw TCP")
    copy = next(r for r in rows if r.path == "memcpy")
    title = (f"KV transfer: model {report['model']} (float32), prompt {report['prompt_tokens']} tokens, chunks of "
             f"{report['chunk_tokens']} tokens x {report['chunk_layers']} layers ({report['shm_chunk_tokens']} tokens "
             f"for shm raw), best of {report['repeats']}")
    lines = [title,
             f"  {'path':12s} {'bytes':>12} {'chunks':>6} {'seconds':>9} {'GB/s':>7} {'/ raw TCP':>9} {'/ memcpy':>9}"]
    lines += [f"  {r.path:12s} {r.kv_bytes:12,} {r.chunks:6d} {r.seconds:9.4f} {r.gbps:7.2f} "
              f"{tcp.seconds / r.seconds:9.2f} {copy.seconds / r.seconds:9.2f}" for r in rows]
    lines += [f"  ({r.path}: opening the transfer{PLACED if r.path == PATH else ''} took {r.setup_seconds * 1e3:.1f}"
              " ms more, before the clock, as the prefill does while its forward pass runs)"
              for r in rows if r.setup_seconds]
    handoffs: list[Handoff] = report["handoffs"]  # type: ignore[assignment]
    lines.append("  handoff through a prefill worker (forward end -> decode holds verified KV):")
    lines += [f"    {h.transport:12s} {h.handoff_seconds * 1e3:8.1f} ms   "
              f"(forward pass {h.forward_seconds * 1e3:.0f} ms; "
              f"chunks streamed for {h.streamed_seconds * 1e3:.0f} ms while layers were computed)" for h in handoffs]
    loads: list[LoadResult] = report["under_load"]  # type: ignore[assignment]
    lines.append("  handoff under load: decode ITL p50/p99 of the streams alone, then while a transfer arrives "
                 "every interval:")
    lines += [f"    {x.transport:12s} {x.streams} streams: alone {x.quiet_itl_p50_ms:.0f}/{x.quiet_itl_p99_ms:.0f} ms, "
              f"with {x.transfers} transfers {x.loaded_itl_p50_ms:.0f}/{x.loaded_itl_p99_ms:.0f} ms" for x in loads]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.bench.transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--chunk-layers", type=int, default=4)
    parser.add_argument("--shm-chunk-tokens", type=int, default=SHM_CHUNK_TOKENS,
                        help="tokens per chunk of the shm raw row (the prefill's --kv-shm-chunk-tokens)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--load-streams", type=int, default=8, help="sequences decoding during the load test")
    parser.add_argument("--load-seconds", type=float, default=8.0, help="length of each load phase")
    parser.add_argument("--load-interval", type=float, default=1.0, help="seconds between arriving transfers")
    parser.add_argument("--quick", action="store_true", help=f"a brief run: {QUICK}")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tune_allocator()  # this process plays the prefill, which tunes it as every service does
    report = asyncio.run(run(args))
    if args.json:
        print(json.dumps({k: [asdict(x) for x in v] if isinstance(v, list) else v for k, v in report.items()},
                         indent=2))
    else:
        print(table(report))


if __name__ == "__main__":
    main()
