"""The prefill's shared-memory sink (services.prefill.shm_sink) against a stream that records
what it is sent: slices go out in chunk order, each only once its chunk's bytes are in the
segment, and the last one without waiting for `close`; the segment is gone after close or abort."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import torch

from services.common import shm
from services.common.errors import TransportUnavailable
from services.common.kv_codec import FP8_ENCODING, ChunkSource, KvChunk, KvEnd, KvLayout, encode_chunk
from services.common.kv_shm import ShmTransport
from services.common.kv_wire import parse_wire
from services.prefill.shm_sink import ShmStreamSink

PREFIX = f"test-sink-{uuid.uuid4().hex[:8]}"


class RecordingCall:
    """A TransferKv call that keeps each message with whether the bytes its slice names were
    already in the segment when it was written."""

    def __init__(self) -> None:
        self.messages: list[tuple[object, bool]] = []
        self._done = asyncio.get_running_loop().create_future()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        pass

    async def write(self, raw: bytes) -> None:
        message = parse_wire(raw)
        self.messages.append((message, _in_segment(message)))

    async def done_writing(self) -> None:
        self._done.set_result(None)

    def done(self) -> bool:
        return self._done.done()

    def cancel(self) -> None:
        self._done.cancel()

    def __await__(self):  # type: ignore[no-untyped-def]
        return self._done.__await__()


def _in_segment(message: object) -> bool:
    if not isinstance(message, KvChunk) or message.shm is None:
        return True
    with open(f"/dev/shm/{message.shm.segment}", "rb") as segment:
        segment.seek(message.shm.offset)
        return segment.read(message.shm.length) == EXPECTED[message.index]


LAYOUT = KvLayout("sink", "fp", 2, 1, 4, 6, 2, 1, "float32")
KEYS = torch.arange(2 * 1 * 6 * 4, dtype=torch.float32).view(2, 1, 6, 4)
CHUNKS = [encode_chunk(LAYOUT, index, KEYS[group : group + 1], -KEYS[group : group + 1])
          for group in range(LAYOUT.layer_groups) for index in LAYOUT.group_chunks(group)]
EXPECTED = {chunk.index: bytes(chunk.data) for chunk in CHUNKS}


def _sink(call: RecordingCall) -> ShmStreamSink:
    host = shm.host_identity()
    return ShmStreamSink(lambda timeout: call, 30.0, ShmTransport("shm", PREFIX, host), host)


async def test_slices_go_in_order_after_their_bytes_and_the_last_without_close() -> None:
    call = RecordingCall()
    sink = _sink(call)
    await sink.send(LAYOUT)
    for chunk in CHUNKS:
        await sink.send(chunk)
    for _ in range(50):  # the last slice goes once its copy is done, not at close
        await asyncio.sleep(0.02)
        if len(call.messages) == 1 + len(CHUNKS):
            break
    assert len(call.messages) == 1 + len(CHUNKS)
    await sink.close(KvEnd("sink", LAYOUT.chunk_count, 7))
    sent = [message for message, _ in call.messages]
    assert isinstance(sent[0], KvLayout) and sent[0].shm_segment
    assert [m.index for m in sent[1:-1] if isinstance(m, KvChunk)] == list(range(len(CHUNKS)))
    assert all(in_segment for _, in_segment in call.messages)  # no slice before its bytes
    assert isinstance(sent[-1], KvEnd)
    await asyncio.sleep(0.1)
    assert shm.segments_of(PREFIX) == []


async def test_abort_with_chunks_on_their_way_leaves_no_segment() -> None:
    call = RecordingCall()
    sink = _sink(call)
    await sink.send(LAYOUT)
    for chunk in CHUNKS[:2]:
        await sink.send(chunk)
    sink.abort()
    await asyncio.sleep(0.1)
    assert shm.segments_of(PREFIX) == []
    assert not any(name.startswith(PREFIX) for name in os.listdir("/dev/shm"))


def _sources(layout: KvLayout = LAYOUT) -> list[ChunkSource]:
    return [ChunkSource(layout, index, KEYS[group : group + 1], -KEYS[group : group + 1])
            for group in range(layout.layer_groups) for index in layout.group_chunks(group)]


async def test_raw_chunks_are_encoded_straight_into_the_segment_and_sent_as_slices() -> None:
    """`place` (what the prefill engine asks a lone sink first) puts each raw chunk's bytes in the
    segment itself, with the checksum of its encoded bytes, so `send` only sends the slice."""
    call = RecordingCall()
    sink = _sink(call)
    await sink.send(LAYOUT)
    for source, chunk in zip(_sources(), CHUNKS, strict=True):
        placed = await sink.place(source)
        assert placed is not None and placed.shm is not None and placed.data == b""
        assert (placed.crc32c, placed.byte_length) == (chunk.crc32c, chunk.byte_length)
        await sink.send(placed)
    await sink.close(KvEnd("sink", LAYOUT.chunk_count, 7))
    sent = [message for message, _ in call.messages]
    assert [m.index for m in sent if isinstance(m, KvChunk)] == list(range(len(CHUNKS)))
    assert all(in_segment for _, in_segment in call.messages)
    await asyncio.sleep(0.1)
    assert shm.segments_of(PREFIX) == []


async def test_only_raw_chunks_of_an_open_shm_transfer_are_placed() -> None:
    grpc_sink = ShmStreamSink(lambda timeout: RecordingCall(), 30.0,
                              ShmTransport("grpc", PREFIX, shm.host_identity()), shm.host_identity())
    await grpc_sink.send(LAYOUT)
    assert await grpc_sink.place(_sources()[0]) is None  # the bytes travel inline
    grpc_sink.abort()
    fp8 = dataclasses.replace(LAYOUT, encoding=FP8_ENCODING)
    fp8_sink = _sink(RecordingCall())
    assert await fp8_sink.place(_sources(fp8)[0]) is None  # nothing opened yet
    await fp8_sink.send(fp8)
    assert await fp8_sink.place(_sources(fp8)[0]) is None  # fp8 is quantized to bytes first
    fp8_sink.abort()


async def test_a_chunk_is_not_placed_into_a_released_segment() -> None:
    sink = _sink(RecordingCall())
    await sink.send(LAYOUT)
    sink.abort()
    with pytest.raises(TransportUnavailable, match="already released"):
        await sink.place(_sources()[0])
    await asyncio.sleep(0.1)
    assert shm.segments_of(PREFIX) == []
