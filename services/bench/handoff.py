"""`make bench-transfer`'s handoff figures: the latency through a real prefill service per transport,
and a decode worker's inter-token latency while transfers arrive (the receiving side's cost).

Transports are prefill service args (HANDOFF_TRANSPORTS: `("--kv-transport", "shm")` and the like
are added as entries); transfers under load are pushed by a sender per transport (LOAD_SENDERS),
because a 2,048-token forward pass on this CPU takes longer than the one-second arrival interval.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc

from services.bench.report import percentile
from services.bench.transfer_rows import TransferCase, admit, admit_with_host, renamed, slug
from services.bench.transfer_shm import send_shm_raw
from services.common.kv_wire import transfer_kv_bytes, wire_bytes
from services.common.pb import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from services.common.server import GRPC_OPTIONS
from services.stack import ServiceSpec, Stack, free_port

# Transport name -> extra prefill service args.
HANDOFF_TRANSPORTS: dict[str, tuple[str, ...]] = {
    f"{transport} {encoding}": ("--kv-transport", transport.lower(), "--kv-wire-encoding", encoding)
    for transport in ("gRPC", "shm") for encoding in ("raw", "fp8")}
HEALTHY_SECONDS = 300.0
STREAM_TOKENS = 256  # tokens per decoding sequence under load (a finished one is followed by the next)


@dataclass(frozen=True, slots=True)
class Handoff:
    transport: str
    forward_seconds: float
    streamed_seconds: float  # chunks streamed while later layers were computed
    handoff_seconds: float  # forward end -> decode holds verified KV


async def handoff_via_prefill(case: TransferCase, transport: str, worker_args: tuple[str, ...]) -> Handoff:
    """One prompt through a prefill worker started with the transport's args, into the decode."""
    port = free_port()
    spec = ServiceSpec("prefill", "prefill", port,
                       ("--port", str(port), *worker_args, *HANDOFF_TRANSPORTS[transport]))
    stack = Stack([spec], log_dir=tempfile.mkdtemp(prefix="bench-handoff-"))
    stack.start()
    try:
        stack.wait_healthy(timeout=HEALTHY_SECONDS)
        done = await _prefill_once(spec.address, case, f"handoff-{slug(transport)}")
    finally:
        stack.stop()
    return Handoff(transport, done.forward_seconds, done.transfer_seconds, done.handoff_seconds)


async def _prefill_once(prefill: str, case: TransferCase, request_id: str) -> prefill_pb2.PrefillDone:
    async with grpc.aio.insecure_channel(prefill) as p, grpc.aio.insecure_channel(case.decode_address) as d:
        generation, shm_host = await admit_with_host(decode_pb2_grpc.DecodeServiceStub(d), request_id, case.prompt)
        done = prefill_pb2.PrefillDone()
        async for event in prefill_pb2_grpc.PrefillServiceStub(p).Prefill(prefill_pb2.PrefillRequest(
                request_id=request_id, prompt_token_ids=case.prompt, decode_address=case.decode_address,
                decode_kv_shm_host=shm_host, sampling=common_pb2.SamplingParams(temperature=0)),
                timeout=HEALTHY_SECONDS):
            if event.HasField("done"):
                done = event.done
        while await generation.read() is not grpc.aio.EOF:
            pass
    return done


# --- handoff under load -----------------------------------------------------------------------------

LoadSender = Callable[[grpc.aio.Channel, TransferCase, str], Awaitable[None]]


async def send_grpc_raw(channel: grpc.aio.Channel, case: TransferCase, request_id: str) -> None:
    """The case's transfer over TransferKv, serialized as the prefill's DecodeStreamSink does."""
    call = transfer_kv_bytes(channel)(timeout=HEALTHY_SECONDS)
    for message in renamed(case.messages, request_id):
        await call.write(wire_bytes(message))
    await call.done_writing()
    await call


# Transport name -> how a transfer is pushed to the decode worker under load.
async def send_grpc_fp8(channel: grpc.aio.Channel, case: TransferCase, request_id: str) -> None:
    await send_grpc_raw(channel, case.as_fp8(), request_id)


async def send_shm_fp8(channel: grpc.aio.Channel, case: TransferCase, request_id: str) -> None:
    await send_shm_raw(channel, case.as_fp8(), request_id)


LOAD_SENDERS: dict[str, LoadSender] = {"gRPC raw": send_grpc_raw, "gRPC fp8": send_grpc_fp8,
                                       "shm raw": send_shm_raw, "shm fp8": send_shm_fp8}


@dataclass(frozen=True, slots=True)
class LoadResult:
    transport: str
    streams: int
    transfers: int
    quiet_itl_p50_ms: float  # the streams alone
    quiet_itl_p99_ms: float
    loaded_itl_p50_ms: float  # while transfers arrive every interval
    loaded_itl_p99_ms: float


async def under_load(case: TransferCase, transport: str, streams: int, seconds: float,
                     interval: float) -> LoadResult:
    """`streams` sequences decode on the worker: ITL for `seconds` alone, then for `seconds` while a
    transfer (of a request admitted for it) arrives every `interval` seconds."""
    async with grpc.aio.insecure_channel(case.decode_address, options=GRPC_OPTIONS) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        gaps: list[float] = []
        decoding = [asyncio.ensure_future(_stream(stub, f"load-{slug(transport)}-{i}", gaps)) for i in range(streams)]
        try:
            await _all_decoding(gaps, streams, decoding)
            gaps.clear()
            await asyncio.sleep(seconds)
            quiet, gaps[:] = list(gaps), []
            sent = await _arrivals(channel, case, transport, seconds, interval)
            loaded = list(gaps)
        finally:
            for task in decoding:
                task.cancel()
            outcomes = await asyncio.gather(*decoding, return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, Exception) and not isinstance(o, asyncio.CancelledError)]
    if failures:
        raise failures[0]
    return LoadResult(transport, streams, sent, percentile(quiet, 0.5) * 1e3, percentile(quiet, 0.99) * 1e3,
                      percentile(loaded, 0.5) * 1e3, percentile(loaded, 0.99) * 1e3)


async def _all_decoding(gaps: list[float], streams: int, decoding: Sequence[asyncio.Future[None]]) -> None:
    """Wait until the streams are past their prefills and decoding (about one gap each)."""
    deadline = time.monotonic() + HEALTHY_SECONDS
    while len(gaps) < 2 * streams:
        failed = [task for task in decoding if task.done()]
        if failed:
            await failed[0]  # raises its error
        if time.monotonic() > deadline:
            raise TimeoutError(f"the {streams} streams did not start decoding")
        await asyncio.sleep(0.05)


async def _stream(stub: decode_pb2_grpc.DecodeServiceStub, request_id: str, gaps: list[float]) -> None:
    """Sequences prefilled on the decode worker, decoding one after another until cancelled; appends
    the inter-token gaps."""
    for turn in itertools.count():
        call = stub.Generate(decode_pb2.DecodeRequest(
            request_id=f"{request_id}-{turn}", prompt_token_ids=list(range(10, 26)),
            kv_source=decode_pb2.KV_SOURCE_LOCAL,
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=STREAM_TOKENS, ignore_eos=True)))
        try:
            last = None
            async for event in call:
                if event.HasField("token"):
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
        finally:
            call.cancel()


async def _arrivals(channel: grpc.aio.Channel, case: TransferCase, transport: str, seconds: float,
                    interval: float) -> int:
    stub = decode_pb2_grpc.DecodeServiceStub(channel)
    sends: list[asyncio.Future[None]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        request_id = f"arrival-{slug(transport)}-{len(sends)}"
        sends.append(asyncio.ensure_future(_one_arrival(stub, channel, case, transport, request_id)))
        await asyncio.sleep(interval)
    await asyncio.gather(*sends)
    return len(sends)


async def _one_arrival(stub: decode_pb2_grpc.DecodeServiceStub, channel: grpc.aio.Channel, case: TransferCase,
                       transport: str, request_id: str) -> None:
    generation = await admit(stub, request_id, case.prompt)
    await LOAD_SENDERS[transport](channel, case, request_id)
    while await generation.read() is not grpc.aio.EOF:
        pass
