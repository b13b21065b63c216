"""`make bench-transfer`: how fast a prompt's KV cache moves from prefill to decode.

For one long prompt on the served model it prints the KV bytes and chunk count, then in the same
run: (1) the gRPC TransferKv stream into a real decode worker process, which validates (CRC-32,
shape, order) and assembles every chunk, timed from the first write to its acknowledgement;
(2) the same bytes over a raw loopback TCP socket to another process; (3) their ratio; and
(4) the whole handoff through a real prefill worker, where chunks stream while later layers are
still being computed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import grpc
import torch

from services.common.kv_codec import KvEnd, KvLayout, encode_chunk
from services.common.kv_wire import to_pb
from services.common.model_files import default_cache_dir
from services.common.pb import common_pb2, decode_pb2, decode_pb2_grpc, kv_pb2, prefill_pb2, prefill_pb2_grpc
from services.common.runtime import ModelRuntime
from services.common.server import GRPC_OPTIONS
from services.stack import ServiceSpec, Stack, free_port

_RECEIVER = """
import socket, sys
server = socket.create_server(("127.0.0.1", 0)); print(server.getsockname()[1], flush=True)
while True:
    conn, _ = server.accept(); total = 0
    with conn:
        view = memoryview(bytearray(1 << 22))
        while (n := conn.recv_into(view)):
            total += n
    if total == 0: break
"""


@dataclass(frozen=True, slots=True)
class TransferReport:
    model: str
    prompt_tokens: int
    kv_bytes: int
    chunk_count: int
    chunk_tokens: int
    chunk_layers: int
    grpc_seconds: float
    grpc_gbps: float
    tcp_seconds: float
    tcp_gbps: float
    ratio: float
    prefill_forward_seconds: float
    prefill_transfer_seconds: float
    prefill_handoff_seconds: float


def build_transfer(runtime: ModelRuntime, prompt: list[int], request_id: str, chunk_tokens: int,
                   chunk_layers: int) -> list[kv_pb2.KvTransferMessage]:
    """The prompt's real KV, encoded once, as the messages of one transfer."""
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    runtime.prefill(prompt, lambda index, k, v: layers.__setitem__(index, (k, v)))
    g = runtime.geometry
    layout = KvLayout(request_id, g.fingerprint, g.num_layers, g.num_kv_heads, g.head_dim, len(prompt),
                      chunk_tokens, chunk_layers, g.dtype)
    messages = [to_pb(layout)]
    for group in range(layout.layer_groups):
        members = range(group * chunk_layers, min((group + 1) * chunk_layers, g.num_layers))
        keys = torch.stack([layers[i][0] for i in members])
        values = torch.stack([layers[i][1] for i in members])
        messages += [to_pb(encode_chunk(layout, i, keys, values)) for i in layout.group_chunks(group)]
    return [*messages, to_pb(KvEnd(request_id, layout.chunk_count, 0))]


def with_request_id(messages: list[kv_pb2.KvTransferMessage], request_id: str) -> list[kv_pb2.KvTransferMessage]:
    renamed = []
    for message in messages:
        copy = kv_pb2.KvTransferMessage()
        copy.CopyFrom(message)
        getattr(copy, copy.WhichOneof("kind")).request_id = request_id
        renamed.append(copy)
    return renamed


async def time_grpc(address: str, messages: list[kv_pb2.KvTransferMessage], prompt: list[int],
                    repeats: int) -> list[float]:
    times = []
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        for attempt in range(repeats):
            request_id = f"bench-{attempt}"
            batch = with_request_id(messages, request_id)
            generation = stub.Generate(decode_pb2.DecodeRequest(
                request_id=request_id, prompt_token_ids=prompt, kv_source=decode_pb2.KV_SOURCE_DIRECT,
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=1)))
            await generation.read()  # Accepted

            async def produce():
                for message in batch:
                    yield message

            started = time.perf_counter()
            await stub.TransferKv(produce())
            times.append(time.perf_counter() - started)
            while await generation.read() is not grpc.aio.EOF:
                pass
    return times


def time_tcp(payloads: list[bytes], repeats: int) -> list[float]:
    receiver = subprocess.Popen([sys.executable, "-c", _RECEIVER], stdout=subprocess.PIPE, text=True)
    port = int(receiver.stdout.readline())
    times = []
    try:
        for _ in range(repeats):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                started = time.perf_counter()
                for payload in payloads:
                    sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                sock.recv(1)  # returns when the receiver has read everything and closed
                times.append(time.perf_counter() - started)
        socket.create_connection(("127.0.0.1", port)).close()  # an empty connection stops the receiver
    finally:
        receiver.wait(timeout=10)
    return times


async def via_prefill(prefill: str, decode: str, prompt: list[int]) -> tuple[float, float, float]:
    async with grpc.aio.insecure_channel(prefill) as p, grpc.aio.insecure_channel(decode) as d:
        generation = decode_pb2_grpc.DecodeServiceStub(d).Generate(decode_pb2.DecodeRequest(
            request_id="bench-prefill", prompt_token_ids=prompt, kv_source=decode_pb2.KV_SOURCE_DIRECT,
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=1)))
        await generation.read()
        done = None
        async for event in prefill_pb2_grpc.PrefillServiceStub(p).Prefill(prefill_pb2.PrefillRequest(
                request_id="bench-prefill", prompt_token_ids=prompt, decode_address=decode,
                sampling=common_pb2.SamplingParams(temperature=0))):
            if event.HasField("done"):
                done = event.done
        while await generation.read() is not grpc.aio.EOF:
            pass
    return done.forward_seconds, done.transfer_seconds, done.handoff_seconds


async def run(args: argparse.Namespace) -> TransferReport:
    runtime = ModelRuntime(args.model, "float32", "cpu", default_cache_dir())
    prompt = torch.randint(10, 49000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    messages = build_transfer(runtime, prompt, "bench", args.chunk_tokens, args.chunk_layers)
    chunks = [m.chunk for m in messages if m.HasField("chunk")]
    kv_bytes = sum(len(c.data) for c in chunks)
    ports = {"decode": free_port(), "prefill": free_port()}
    worker = ("--model", args.model, "--log-level", "WARNING")
    specs = [ServiceSpec("decode", "decode", ports["decode"], ("--port", str(ports["decode"]), *worker)),
             ServiceSpec("prefill", "prefill", ports["prefill"],
                         ("--port", str(ports["prefill"]), "--kv-chunk-tokens", str(args.chunk_tokens),
                          "--kv-chunk-layers", str(args.chunk_layers), *worker))]
    stack = Stack(specs, log_dir=tempfile.mkdtemp(prefix="bench-transfer-"))
    stack.start()
    try:
        stack.wait_healthy(timeout=300)
        grpc_times = await time_grpc(specs[0].address, messages, prompt, args.repeats)
        tcp_times = time_tcp([m.SerializeToString() for m in messages], args.repeats)
        forward, transfer, handoff = await via_prefill(specs[1].address, specs[0].address, prompt)
    finally:
        stack.stop()
    grpc_best, tcp_best = min(grpc_times), min(tcp_times)
    return TransferReport(args.model, len(prompt), kv_bytes, len(chunks), args.chunk_tokens, args.chunk_layers,
                          grpc_best, kv_bytes / grpc_best / 1e9, tcp_best, kv_bytes / tcp_best / 1e9,
                          tcp_best / grpc_best, forward, transfer, handoff)


def print_report(r: TransferReport, repeats: int) -> None:
    mib = r.kv_bytes / 2**20
    print(f"KV transfer: model {r.model} (float32), prompt {r.prompt_tokens} tokens")
    print(f"  KV bytes              {r.kv_bytes:,} ({mib:.1f} MiB)")
    print(f"  chunks                {r.chunk_count} x {mib / r.chunk_count:.2f} MiB "
          f"({r.chunk_tokens} tokens x {r.chunk_layers} layers)")
    print(f"  gRPC TransferKv       {r.grpc_seconds * 1e3:8.1f} ms  {r.grpc_gbps:6.2f} GB/s   "
          f"(best of {repeats}; decode verifies and assembles every chunk)")
    print(f"  raw loopback TCP      {r.tcp_seconds * 1e3:8.1f} ms  {r.tcp_gbps:6.2f} GB/s   "
          f"(best of {repeats}, same bytes)")
    print(f"  ratio gRPC / TCP      {r.ratio:.2f}")
    print(f"  via prefill service   forward pass {r.prefill_forward_seconds * 1e3:.0f} ms; chunks streamed for "
          f"{r.prefill_transfer_seconds * 1e3:.0f} ms while layers were computed; handoff latency (forward "
          f"end -> decode holds verified KV) {r.prefill_handoff_seconds * 1e3:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.bench.transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--chunk-layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    print(json.dumps(asdict(report), indent=2)) if args.json else print_report(report, args.repeats)


if __name__ == "__main__":
    main()
