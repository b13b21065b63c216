"""The shared-memory rows of `make bench-transfer` (services.bench.transfer adds them to its rows).

The same KV bytes as the gRPC row, into the same real decode worker process, through the shm
transport: this side plays the prefill with the prefill's own sink (ShmStreamSink). Sending the
layout opens the TransferKv call, creates and reserves the transfer's segment and writes the layout;
then, for `shm raw`, the sink encodes each raw chunk straight into the segment (`place`), as the
prefill does for each layer group while its forward pass runs. Both are reported apart, as setup:
they are the counterpart of the gRPC rows' serialization, which is also done before their clock
(their clocks include opening their call, ~1 ms). The clock runs from the first chunk's slice to the
decode's acknowledgement (it mapped the segment, verified every chunk, checksum, shape and
finiteness, and copied it into its pool). `shm fp8` copies its quantized bytes into the segment
within the clock (fp8 chunks are quantized to bytes first). The table sets them next to raw TCP
and `memcpy` of the same bytes.
"""

from __future__ import annotations

import time

import grpc

from services.bench.transfer_rows import Row, TransferCase, admit_with_host, renamed, renamed_sources, slug
from services.common import shm
from services.common.kv_codec import ChunkSource, KvChunk, KvEnd, KvLayout
from services.common.kv_shm import ShmTransport
from services.common.kv_wire import KvMessage, transfer_kv_bytes
from services.common.pb import decode_pb2_grpc
from services.common.server import GRPC_OPTIONS
from services.prefill.shm_sink import ShmStreamSink

BENCH_PREFIX = "disagg-bench"
PATH = "shm raw"
TIMEOUT_SECONDS = 300.0


async def shm_raw(case: TransferCase, path: str = PATH) -> Row:
    times, setups = [], []
    async with grpc.aio.insecure_channel(case.decode_address, options=GRPC_OPTIONS) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        for attempt in range(case.repeats):
            request_id = f"bench-{slug(path)}-{attempt}"
            generation, host = await admit_with_host(stub, request_id, case.prompt)
            if not host:
                raise RuntimeError("the decode worker refuses shared-memory transfers (--no-kv-shm)")
            setup, seconds = await _through_sink(channel, renamed(case.messages, request_id), host,
                                                 renamed_sources(case.sources, request_id))
            setups.append(setup)
            times.append(seconds)
            while await generation.read() is not grpc.aio.EOF:
                pass
    return Row(path, case.kv_bytes, len(case.chunks), min(times), setup_seconds=min(setups))


async def _through_sink(channel: grpc.aio.Channel, messages: list[KvMessage], decode_host: str,
                        sources: list[ChunkSource]) -> tuple[float, float]:
    """The transfer through the prefill's shm sink: seconds opening it (the layout) and encoding
    the raw chunks `sources` into the segment, then seconds from the first chunk to the decode's
    acknowledgement. Chunks without a source are copied into the segment from their bytes."""
    layout, *rest = messages
    if not isinstance(layout, KvLayout) or not isinstance(rest[-1], KvEnd):
        raise TypeError("a transfer is a layout, chunks and an end")
    sink = ShmStreamSink(transfer_kv_bytes(channel), TIMEOUT_SECONDS, ShmTransport("shm", BENCH_PREFIX,
                                                                                    shm.host_identity()), decode_host)
    try:
        opened = time.perf_counter()
        await sink.send(layout)
        placed = [await sink.place(source) for source in sources]
        chunks = placed if sources else rest[:-1]
        started = time.perf_counter()
        for chunk in chunks:
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
    await _through_sink(channel, renamed(case.messages, request_id), shm.host_identity(),
                        renamed_sources(case.sources, request_id))
