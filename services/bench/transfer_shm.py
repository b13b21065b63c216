"""The shared-memory row of `make bench-transfer` (services.bench.transfer adds `shm_raw` to its rows).

The same KV bytes as the gRPC row, into the same real decode worker process, through the shm
transport: this side plays the prefill. It creates and reserves the transfer's segment (the
prefill does that while its forward pass runs: the row reports it apart, as setup), then the
clock runs from writing the first chunk into it and sending each chunk's slice to the decode's
acknowledgement (it mapped the segment, verified every chunk, checksum, shape and finiteness, and
copied it into its pool). The table sets it next to raw TCP and `memcpy` of the same bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import grpc

from services.bench.transfer_rows import Row, TransferCase, admit_with_host, renamed, slug
from services.common.kv_codec import KvChunk, KvLayout
from services.common.kv_shm import ShmTransferWriter
from services.common.kv_wire import KvMessage, transfer_kv_bytes, wire_bytes
from services.common.pb import decode_pb2_grpc
from services.common.server import GRPC_OPTIONS

BENCH_PREFIX = "disagg-bench"
PATH = "shm raw"


async def _through_segment(layout: KvLayout, rest: list[KvMessage],
                           writer: ShmTransferWriter) -> AsyncIterator[bytes]:
    yield wire_bytes(dataclasses.replace(layout, shm_segment=writer.name))
    for message in rest:
        if isinstance(message, KvChunk):  # off the event loop, as the prefill's shm sink puts it
            message = await asyncio.to_thread(writer.put, message)
        yield wire_bytes(message)


async def shm_raw(case: TransferCase, path: str = PATH) -> Row:
    times, reserves = [], []
    async with grpc.aio.insecure_channel(case.decode_address, options=GRPC_OPTIONS) as channel:
        stub, transfer_kv = decode_pb2_grpc.DecodeServiceStub(channel), transfer_kv_bytes(channel)
        for attempt in range(case.repeats):
            request_id = f"bench-{slug(path)}-{attempt}"
            layout, *rest = renamed(case.messages, request_id)
            if not isinstance(layout, KvLayout):
                raise TypeError("a transfer starts with its layout")
            generation, host = await admit_with_host(stub, request_id, case.prompt)
            if not host:
                raise RuntimeError("the decode worker refuses shared-memory transfers (--no-kv-shm)")
            opened = time.perf_counter()
            writer = ShmTransferWriter.create(BENCH_PREFIX, layout)
            try:
                started = time.perf_counter()
                reserves.append(started - opened)
                await transfer_kv(_through_segment(layout, rest, writer), timeout=300)
                times.append(time.perf_counter() - started)
            finally:
                writer.destroy()
            while await generation.read() is not grpc.aio.EOF:
                pass
    return Row(path, case.kv_bytes, len(case.chunks), min(times), setup_seconds=min(reserves))


async def shm_fp8(case: TransferCase) -> Row:
    return await shm_raw(case.as_fp8(), path="shm fp8")


async def send_shm_raw(channel: grpc.aio.Channel, case: TransferCase, request_id: str) -> None:
    """The case's transfer through a segment, as the prefill's shm sink sends it (handoff under load)."""
    layout, *rest = renamed(case.messages, request_id)
    if not isinstance(layout, KvLayout):
        raise TypeError("a transfer starts with its layout")
    writer = ShmTransferWriter.create(BENCH_PREFIX, layout)
    try:
        await transfer_kv_bytes(channel)(_through_segment(layout, rest, writer), timeout=300)
    finally:
        writer.destroy()
