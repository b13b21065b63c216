"""The shared-memory rows of `make bench-transfer` (services.bench.transfer calls `measure_shm`).

On the same KV bytes as the gRPC row: (1) the shm transport into the same real decode worker
process, timed from creating the transfer's segment (this side plays the prefill: it writes every
chunk into the segment and sends its slice) to the decode's acknowledgement (it mapped the
segment, verified every chunk, checksum, shape and finiteness, and copied it into its pool);
(2) `memcpy` of the same bytes into a buffer already in memory, the ceiling; (3) their ratio; and
(4) the handoff through a real prefill worker started with `--kv-transport shm`.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np

from services.common.kv_codec import KvChunk, KvLayout
from services.common.kv_shm import ShmTransferWriter
from services.common.kv_wire import KvMessage, from_pb, to_pb
from services.common.pb import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    kv_pb2,
    prefill_pb2,
    prefill_pb2_grpc,
)
from services.common.server import GRPC_OPTIONS
from services.stack import ServiceSpec, Stack, free_port

BENCH_PREFIX = "disagg-bench"


@dataclass(frozen=True, slots=True)
class ShmReport:
    shm_seconds: float
    shm_gbps: float
    memcpy_seconds: float
    memcpy_gbps: float
    ratio: float  # shm throughput / memcpy throughput
    prefill_forward_seconds: float
    prefill_transfer_seconds: float
    prefill_handoff_seconds: float


async def _admit(stub: decode_pb2_grpc.DecodeServiceStub, request_id: str,
                 prompt: list[int]) -> tuple[grpc.aio.UnaryStreamCall, str]:
    generation = stub.Generate(decode_pb2.DecodeRequest(
        request_id=request_id, prompt_token_ids=prompt, kv_source=decode_pb2.KV_SOURCE_DIRECT,
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=1)))
    accepted = await generation.read()
    return generation, accepted.accepted.kv_shm_host


async def _drain(generation: grpc.aio.UnaryStreamCall) -> None:
    while await generation.read() is not grpc.aio.EOF:
        pass


def _renamed(messages: list[kv_pb2.KvTransferMessage], request_id: str) -> tuple[KvLayout, list[KvMessage]]:
    """The transfer's layout and its other messages, as domain objects of `request_id`."""
    renamed = [dataclasses.replace(from_pb(message), request_id=request_id) for message in messages]
    layout = renamed[0]
    if not isinstance(layout, KvLayout):
        raise TypeError("a transfer starts with its layout")
    return layout, renamed[1:]


async def time_shm(address: str, messages: list[kv_pb2.KvTransferMessage], prompt: list[int],
                   repeats: int) -> list[float]:
    times = []
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        for attempt in range(repeats):
            request_id = f"bench-shm-{attempt}"
            layout, rest = _renamed(messages, request_id)
            generation, host = await _admit(stub, request_id, prompt)
            if not host:
                raise RuntimeError("the decode worker refuses shared-memory transfers (--no-kv-shm)")
            started = time.perf_counter()
            writer = ShmTransferWriter.create(BENCH_PREFIX, layout)

            async def produce(layout: KvLayout = layout, rest: list[KvMessage] = rest,
                              writer: ShmTransferWriter = writer) -> AsyncIterator[kv_pb2.KvTransferMessage]:
                yield to_pb(dataclasses.replace(layout, shm_segment=writer.name))
                for message in rest:
                    yield to_pb(writer.put(message) if isinstance(message, KvChunk) else message)

            try:
                await stub.TransferKv(produce())
                times.append(time.perf_counter() - started)
            finally:
                writer.destroy()
            await _drain(generation)
    return times


def time_memcpy(payloads: list[bytes], repeats: int) -> list[float]:
    """Copy the chunk bytes into one buffer already in memory (its pages touched): the ceiling."""
    target = np.ones(sum(len(p) for p in payloads), np.uint8)
    sources = [np.frombuffer(p, np.uint8) for p in payloads]
    times = []
    for _ in range(repeats):
        started, offset = time.perf_counter(), 0
        for source in sources:
            target[offset : offset + len(source)] = source
            offset += len(source)
        times.append(time.perf_counter() - started)
    return times


async def via_prefill_shm(decode: str, prompt: list[int], args: argparse.Namespace) -> tuple[float, float, float]:
    """The handoff through a real prefill worker with --kv-transport shm (started here)."""
    port = free_port()
    spec = ServiceSpec("prefill-shm", "prefill", port, (
        "--port", str(port), "--metrics-port", "0", "--model", args.model, "--log-level", "WARNING",
        "--kv-chunk-tokens", str(args.chunk_tokens), "--kv-chunk-layers", str(args.chunk_layers),
        "--kv-transport", "shm", "--shm-prefix", BENCH_PREFIX))
    stack = Stack([spec], log_dir=tempfile.mkdtemp(prefix="bench-transfer-shm-"))
    stack.start()
    try:
        stack.wait_healthy(timeout=300)
        async with grpc.aio.insecure_channel(spec.address) as p, grpc.aio.insecure_channel(decode) as d:
            generation, host = await _admit(decode_pb2_grpc.DecodeServiceStub(d), "bench-prefill-shm", prompt)
            done = None
            async for event in prefill_pb2_grpc.PrefillServiceStub(p).Prefill(prefill_pb2.PrefillRequest(
                    request_id="bench-prefill-shm", prompt_token_ids=prompt, decode_address=decode,
                    decode_kv_shm_host=host, sampling=common_pb2.SamplingParams(temperature=0))):
                if event.HasField("done"):
                    done = event.done
            await _drain(generation)
    finally:
        stack.stop()
    assert done is not None and done.kv_transport == "shm", "the prefill did not use shared memory"
    return done.forward_seconds, done.transfer_seconds, done.handoff_seconds


async def measure_shm(decode: str, messages: list[kv_pb2.KvTransferMessage], prompt: list[int],
                  args: argparse.Namespace) -> ShmReport:
    payloads = [m.chunk.data for m in messages if m.HasField("chunk")]
    kv_bytes = sum(len(p) for p in payloads)
    shm_best = min(await time_shm(decode, messages, prompt, args.repeats))
    memcpy_best = min(time_memcpy(payloads, args.repeats))
    forward, transfer, handoff = await via_prefill_shm(decode, prompt, args)
    return ShmReport(shm_best, kv_bytes / shm_best / 1e9, memcpy_best, kv_bytes / memcpy_best / 1e9,
                     memcpy_best / shm_best, forward, transfer, handoff)


def print_shm(r: ShmReport, repeats: int) -> None:
    print(f"  shm transport         {r.shm_seconds * 1e3:8.1f} ms  {r.shm_gbps:6.2f} GB/s   "
          f"(best of {repeats}; push into a segment, decode verifies and copies into its pool)")
    print(f"  memcpy                {r.memcpy_seconds * 1e3:8.1f} ms  {r.memcpy_gbps:6.2f} GB/s   "
          f"(best of {repeats}, same bytes)")
    print(f"  ratio shm / memcpy    {r.ratio:.2f}")
    print(f"  via prefill (shm)     forward pass {r.prefill_forward_seconds * 1e3:.0f} ms; chunks pushed for "
          f"{r.prefill_transfer_seconds * 1e3:.0f} ms; handoff latency {r.prefill_handoff_seconds * 1e3:.0f} ms")
