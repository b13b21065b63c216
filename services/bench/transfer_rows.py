"""Rows of `make bench-transfer`'s table: one way of moving the same KV bytes each, timed in the same run.

A row producer takes the TransferCase (the prompt's real KV, encoded once, and the decode worker to
send it to) and returns a Row. A new transport or encoding adds one small producer to ROWS (for
example an shm producer that opens its transfer with the decode's shared-memory path).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from services.common.kv_codec import ChunkSource, KvChunk
from services.common.kv_wire import KvMessage, transfer_kv_bytes, wire_bytes
from services.common.pb import common_pb2, decode_pb2, decode_pb2_grpc
from services.common.server import GRPC_OPTIONS

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
_GRPC_SINK = """
import asyncio, grpc
from services.common.allocator import tune_allocator
from services.common.kv_wire import TRANSFER_KV_PATH
from services.common.server import GRPC_OPTIONS
tune_allocator()  # as every service does
async def transfer_kv(messages, context):
    async for _ in messages:
        pass
    return b""
async def main():
    server = grpc.aio.server(options=GRPC_OPTIONS)
    method = grpc.stream_unary_rpc_method_handler(transfer_kv, request_deserializer=bytes, response_serializer=bytes)
    service, name = TRANSFER_KV_PATH.strip("/").split("/")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {name: method}),))
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""
RECEIVER_SECONDS = 10.0  # how long the TCP receiver process may take to stop


@dataclass(frozen=True, slots=True)
class TransferCase:
    """The bytes every row moves: one prompt's KV transfer (layout, chunks, end), and where to."""

    prompt: list[int]
    messages: list[KvMessage]
    decode_address: str
    repeats: int
    fp8_messages: list[KvMessage] = dataclasses.field(default_factory=list)  # the same KV, fp8 on the wire
    sources: list[ChunkSource] = dataclasses.field(default_factory=list)  # the raw chunks before encoding

    def as_fp8(self) -> TransferCase:
        """The case moving the fp8 encoding of the same KV (wire bytes: data and scales)."""
        return dataclasses.replace(self, messages=self.fp8_messages, fp8_messages=[], sources=[])

    @property
    def chunks(self) -> list[KvChunk]:
        return [m for m in self.messages if isinstance(m, KvChunk)]

    @property
    def kv_bytes(self) -> int:
        return sum(c.byte_length + len(c.scales) for c in self.chunks)


@dataclass(frozen=True, slots=True)
class Row:
    """One way of moving the case's bytes: best time of the repeats."""

    path: str
    kv_bytes: int
    chunks: int
    seconds: float
    setup_seconds: float = 0.0  # work done before the clock starts, while the forward pass runs

    @property
    def gbps(self) -> float:
        return self.kv_bytes / self.seconds / 1e9


RowProducer = Callable[[TransferCase], Awaitable[Row]]


def slug(name: str) -> str:
    """A row or transport name as part of a request id."""
    return "".join(c if c.isalnum() else "-" for c in name)


def renamed(messages: list[KvMessage], request_id: str) -> list[KvMessage]:
    """The transfer for another request id (each repeat is a new admitted request)."""
    return [dataclasses.replace(m, request_id=request_id) for m in messages]


def renamed_sources(sources: list[ChunkSource], request_id: str) -> list[ChunkSource]:
    return [dataclasses.replace(s, layout=dataclasses.replace(s.layout, request_id=request_id)) for s in sources]


async def admit_with_host(stub: decode_pb2_grpc.DecodeServiceStub, request_id: str,
                          prompt: list[int]) -> tuple[grpc.aio.UnaryStreamCall, str]:
    """A decode request waiting for pushed KV (one token, so it ends right after the transfer), and
    the host identity the decode reported in Accepted (empty: it refuses shared-memory transfers)."""
    generation = stub.Generate(decode_pb2.DecodeRequest(
        request_id=request_id, prompt_token_ids=prompt, kv_source=decode_pb2.KV_SOURCE_DIRECT,
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=1)), timeout=300)
    accepted = await generation.read()
    return generation, accepted.accepted.kv_shm_host


async def admit(stub: decode_pb2_grpc.DecodeServiceStub, request_id: str,
                prompt: list[int]) -> grpc.aio.UnaryStreamCall:
    return (await admit_with_host(stub, request_id, prompt))[0]


async def grpc_raw(case: TransferCase, encoded: Callable[[list[KvMessage]], list[bytes]] | None = None,
                   path: str = "gRPC raw") -> Row:
    """TransferKv into the decode worker, which verifies every chunk and writes it into its pool;
    timed from the first write to the acknowledgement. Messages are serialized before the clock
    starts (as the prefill does while its forward pass runs), the same as the TCP row's bytes."""
    times = []
    async with grpc.aio.insecure_channel(case.decode_address, options=GRPC_OPTIONS) as channel:
        stub, transfer_kv = decode_pb2_grpc.DecodeServiceStub(channel), transfer_kv_bytes(channel)
        for attempt in range(case.repeats):
            request_id = f"bench-{slug(path)}-{attempt}"
            payloads = (encoded or _wire)(renamed(case.messages, request_id))
            generation = await admit(stub, request_id, case.prompt)
            times.append(await _timed_stream(transfer_kv, payloads))
            while await generation.read() is not grpc.aio.EOF:
                pass
    return Row(path, case.kv_bytes, len(case.chunks), min(times))


async def grpc_sink(case: TransferCase) -> Row:
    """The same TransferKv stream into a gRPC server (another process, the same channel options)
    that only reads the messages: what gRPC itself costs, before the decode's parsing, checks and
    pool writes."""
    sink = subprocess.Popen([sys.executable, "-c", _GRPC_SINK], stdout=subprocess.PIPE, text=True)
    try:
        port = int(sink.stdout.readline())  # type: ignore[union-attr]
        payloads, times = _wire(case.messages), []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
            transfer_kv = transfer_kv_bytes(channel)
            for _ in range(case.repeats):
                times.append(await _timed_stream(transfer_kv, payloads))
    finally:
        sink.kill()
        sink.wait(timeout=RECEIVER_SECONDS)
    return Row("gRPC sink", case.kv_bytes, len(case.chunks), min(times))


async def _timed_stream(transfer_kv: grpc.aio.StreamUnaryMultiCallable, payloads: list[bytes]) -> float:
    """Seconds from the first write of one TransferKv stream to its reply."""
    call = transfer_kv(timeout=300)
    started = time.perf_counter()
    for payload in payloads:
        await call.write(payload)
    await call.done_writing()
    await call
    return time.perf_counter() - started


def _wire(messages: list[KvMessage]) -> list[bytes]:
    return [wire_bytes(m) for m in messages]


async def raw_tcp(case: TransferCase) -> Row:
    """The same serialized bytes over a loopback TCP socket to another process that only reads them."""
    return await asyncio.to_thread(_raw_tcp, case)


def _raw_tcp(case: TransferCase) -> Row:
    payloads = _wire(case.messages)
    receiver = subprocess.Popen([sys.executable, "-c", _RECEIVER], stdout=subprocess.PIPE, text=True)
    port = int(receiver.stdout.readline())  # type: ignore[union-attr]
    times = []
    try:
        for _ in range(case.repeats):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                started = time.perf_counter()
                for payload in payloads:
                    sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                sock.recv(1)  # returns when the receiver has read everything and closed
                times.append(time.perf_counter() - started)
        socket.create_connection(("127.0.0.1", port)).close()  # an empty connection stops the receiver
    finally:
        receiver.wait(timeout=RECEIVER_SECONDS)
    return Row("raw TCP", case.kv_bytes, len(case.chunks), min(times))


async def memcpy(case: TransferCase) -> Row:
    """Each chunk's bytes copied once into a buffer of the transfer's size, in this process."""
    target = memoryview(bytearray(case.kv_bytes))
    times = []
    for _ in range(case.repeats):
        started, offset = time.perf_counter(), 0
        for chunk in case.chunks:
            target[offset : offset + chunk.byte_length] = chunk.data
            offset += chunk.byte_length
        times.append(time.perf_counter() - started)
    return Row("memcpy", case.kv_bytes, len(case.chunks), min(times))


# The table's rows, in order; "raw TCP" and "memcpy" are the references every ratio is taken to.
async def grpc_fp8(case: TransferCase) -> Row:
    """The same KV with `--kv-wire-encoding fp8`: a quarter of the bytes; the decode also
    dequantizes each chunk into its pool dtype."""
    return await grpc_raw(case.as_fp8(), path="gRPC fp8")


ROWS: list[RowProducer] = [grpc_raw, grpc_fp8, grpc_sink, raw_tcp, memcpy]
