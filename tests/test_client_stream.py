"""A client-streaming call that its server ends early, while the client still writes, reports the
server's status: grpc.aio replaces it with INTERNAL "Internal error from Core" in a race
(grpc/grpc#36066), which made a decode's refusal of a KV transfer look like an internal error to
the prefill (and failed test_a_transfer_starting_past_the_held_prefix_is_refused in CI). The server
runs in its own process, as a decode worker does: there the race is lost in about half the calls."""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
import torch

from services.common.client_stream import STAND_IN_DETAILS, ServerStatus
from services.common.errors import UpstreamError
from services.common.kv_codec import KvEnd, KvLayout, encode_chunk
from services.prefill.sinks import DecodeStreamSink

METHOD = "/test.Refuser/Refuse"
CALLS = 40
REFUSER = f"""
import asyncio, grpc
async def refuse(requests, context):
    async for _ in requests:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused at the first message")
    return b""
async def main():
    server = grpc.aio.server()
    handler = grpc.stream_unary_rpc_method_handler(refuse, request_deserializer=bytes, response_serializer=bytes)
    service, name = "{METHOD}".strip("/").split("/")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {{name: handler}}),))
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""


@pytest.fixture(scope="module")
def refuser() -> Iterator[str]:
    process = subprocess.Popen([sys.executable, "-c", REFUSER], stdout=subprocess.PIPE, text=True)
    try:
        yield f"127.0.0.1:{int(process.stdout.readline())}"  # type: ignore[union-attr]
    finally:
        process.kill()
        process.wait(timeout=10)


async def _statuses(address: str, keep: bool) -> collections.Counter[tuple[grpc.StatusCode, str]]:
    seen: collections.Counter[tuple[grpc.StatusCode, str]] = collections.Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        multicallable = channel.stream_unary(METHOD, request_serializer=bytes, response_deserializer=bytes)
        for _ in range(CALLS):
            call = multicallable(timeout=30)
            status = ServerStatus(call) if keep else None
            try:
                for _ in range(32):  # still writing while the server refuses
                    await call.write(b"x" * (256 << 10))
                await call.done_writing()
                await call
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                try:
                    await call
                except grpc.aio.AioRpcError as error:
                    final = status.error(error) if status else error
                    seen[(final.code(), final.details())] += 1
    return seen


async def test_the_server_status_is_kept_when_a_write_fails_as_the_call_ends(refuser: str) -> None:
    kept = await _statuses(refuser, keep=True)
    assert kept == {(grpc.StatusCode.INVALID_ARGUMENT, "refused at the first message"): CALLS}


async def test_grpc_alone_loses_it_at_times(refuser: str) -> None:
    """What the keeper works around (skipped where this grpc never lost it in the run)."""
    plain = await _statuses(refuser, keep=False)
    if (grpc.StatusCode.INTERNAL, STAND_IN_DETAILS) not in plain:
        pytest.skip(f"grpc reported the server's status in all {CALLS} calls this time")
    assert sum(plain.values()) == CALLS


async def test_a_prefill_sink_reports_the_decodes_refusal_as_the_decode_gave_it(refuser: str) -> None:
    """The prefill's stream to a decode worker surfaces the decode's status, never grpc's stand-in."""
    layout = KvLayout("r", "fp", 4, 4, 64, 1024, 256, 1, "float32")  # 256 KiB chunks
    keys = torch.ones(4, 4, 1024, 64)
    chunks = [encode_chunk(layout, index, keys[index // 4 : index // 4 + 1], keys[index // 4 : index // 4 + 1])
              for index in range(layout.chunk_count)]
    seen: collections.Counter[tuple[grpc.StatusCode, str]] = collections.Counter()
    async with grpc.aio.insecure_channel(refuser) as channel:
        for _ in range(CALLS):
            sink = DecodeStreamSink(channel.stream_unary(METHOD, request_serializer=bytes,
                                                         response_deserializer=bytes), 30)
            with pytest.raises(UpstreamError) as refused:
                await sink.send(layout)
                for chunk in chunks:
                    await sink.send(chunk)
                await sink.close(KvEnd("r", layout.chunk_count, 1))
            seen[(refused.value.code, str(refused.value))] += 1
    assert seen == {(grpc.StatusCode.INVALID_ARGUMENT, "decode worker: refused at the first message"): CALLS}
