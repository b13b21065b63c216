"""The shared-memory row of `make bench-transfer` (services.bench.transfer adds `shm_raw` to its rows).

The same KV bytes as the gRPC row, into the same real decode worker process, through the shm
transport: this side plays the prefill with the prefill's own sink (ShmStreamSink). Sending the
layout opens the TransferKv call, creates and reserves the transfer's segment and writes the layout
(the prefill does that while its forward pass runs: the row reports it apart, as setup; the gRPC
rows' clocks include opening their call, ~1 ms); then the clock runs from the first chunk, which the
sink copies into the segment and whose slice it sends, to the decode's acknowledgement (it mapped
the segment, verified every chunk, checksum, shape and finiteness, and copied it into its pool).
The table sets it next to raw TCP and `memcpy` of the same bytes.
"""

from __future__ import annotations

import time

import grpc

from services.bench.transfer_rows import Row, TransferCase, admit_with_host, renamed, slug
from services.common import shm
from services.common.kv_codec import KvChunk, KvEnd, KvLayout
from services.common.kv_shm import ShmTransport
from services.common.kv_wire import KvMessage, transfer_kv_bytes
from services.common.pb import decode_pb2_grpc
from services.common.server import GRPC_OPTIONS
from services.prefill.shm_sink import ShmStreamSink

BENCH_PREFIX = "disagg-bench"
PATH = "shm raw"
TIMEOUT_SECONDS = 300.0


async def shm_raw(case: TransferCase, path: str = PATH) -> Row:
    times, reserves = [], []
    async with grpc.aio.insecure_channel(case.decode_address, options=GRPC_OPTIONS) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        for attempt in range(case.repeats):
            request_id = f"bench-{slug(path)}-{attempt}"
            generation, host = await admit_with_host(stub, request_id, case.prompt)
            if not host:
                raise RuntimeError("the decode worker refuses shared-memory transfers (--no-kv-shm)")
            setup, seconds = await _through_sink(channel, renamed(case.messages, request_id), host)
            reserves.append(setup)
            times.append(seconds)
            while await generation.read() is not grpc.aio.EOF:
                pass
    return Row(path, case.kv_bytes, len(case.chunks), min(times), setup_seconds=min(reserves))


async def _through_sink(channel: grpc.aio.Channel, messages: list[KvMessage], decode_host: str) -> tuple[float, float]:
    """The transfer through the prefill's shm sink: seconds opening it (layout), then seconds from
    the first chunk to the decode's acknowledgement."""
    layout, *rest = messages
    if not isinstance(layout, KvLayout) or not isinstance(rest[-1], KvEnd):
        raise TypeError("a transfer is a layout, chunks and an end")
    sink = ShmStreamSink(transfer_kv_bytes(channel), TIMEOUT_SECONDS, ShmTransport("shm", BENCH_PREFIX,
                                                                                    shm.host_identity()), decode_host)
    try:
        opened = time.perf_counter()
        await sink.send(layout)
        started = time.perf_counter()
        for chunk in rest[:-1]:
            if not isinstance(chunk, KvChunk):
                raise TypeError("a transfer's middle messages are chunks")
            await sink.send(chunk)
        await sink.close(rest[-1])
        return started - opened, time.perf_counter() - started
    except BaseException:
        sink.abort()
        raise


async def shm_fp8(case: TransferCase) -> Row:
    return await shm_raw(case.as_fp8(), path="shm fp8")


async def send_shm_raw(channel: grpc.aio.Channel, case: TransferCase, request_id: str) -> None:
    """The case's transfer through the prefill's shm sink (handoff under load)."""
    await _through_sink(channel, renamed(case.messages, request_id), shm.host_identity())
