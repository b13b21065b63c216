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
from prometheus_client import CollectorRegistry

from services.common import shm
from services.common.errors import TransportUnavailable
from services.common.kv_codec import FP8_ENCODING, RAW_ENCODING, ChunkSource, KvChunk, KvEnd, KvLayout, encode_chunk
from services.common.kv_shm import ShmTransferWriter, ShmTransport
from services.common.kv_wire import parse_wire
from services.common.metrics import PrefillMetrics
from services.common.model_thread import ModelThread
from services.common.runtime import ModelRuntime
from services.common.sampling import Sampling
from services.prefill.engine import OWN_CHUNK_BYTES, ChunkGeometry, PrefillEngine, PrefillJob
from services.prefill.records import PrefillSummary
from services.prefill.shm_sink import ShmStreamSink

PREFIX = f"test-sink-{uuid.uuid4().hex[:8]}"


class RecordingCall:
    """A TransferKv call that keeps each message with the bytes its slice named in the segment
    when it was written (None for other messages)."""

    def __init__(self) -> None:
        self.messages: list[tuple[object, bool]] = []
        self._done = asyncio.get_running_loop().create_future()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        pass

    async def write(self, raw: bytes) -> None:
        message = parse_wire(raw)
        self.messages.append((message, _slice_bytes(message)))

    async def done_writing(self) -> None:
        self._done.set_result(None)

    def done(self) -> bool:
        return self._done.done()

    def cancel(self) -> None:
        self._done.cancel()

    def __await__(self):  # type: ignore[no-untyped-def]
        return self._done.__await__()


def _slice_bytes(message: object) -> bytes | None:
    if not isinstance(message, KvChunk) or message.shm is None:
        return None
    with open(f"/dev/shm/{message.shm.segment}", "rb") as segment:
        segment.seek(message.shm.offset)
        return segment.read(message.shm.length)


def _in_segment(call: RecordingCall, expected: dict[int, bytes]) -> bool:
    """Whether every slice's bytes were in the segment when it went."""
    return all(written == expected[message.index] for message, written in call.messages  # type: ignore[attr-defined]
               if written is not None)


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
    assert _in_segment(call, EXPECTED)  # no slice before its bytes
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
    assert _in_segment(call, EXPECTED)
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


async def test_the_prefill_engine_places_raw_chunks_in_the_segment_and_copies_none(tiny: ModelRuntime,
                                                                                    monkeypatch) -> None:
    """Through the engine, a lone shm sink's raw chunks are encoded straight into the segment: no
    chunk's bytes are copied there afterwards, each slice holds what `encode` gives, and the chunks
    take the job's own length (its transport's, --kv-shm-chunk-tokens)."""
    def no_copy(*args: object) -> None:
        raise AssertionError("a raw chunk's bytes were copied into the segment")

    monkeypatch.setattr(ShmTransferWriter, "fill", no_copy)
    prompt = [(13 * i) % 900 + 10 for i in range(40)]
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    tiny.prefill(prompt, lambda index, k, v: layers.__setitem__(index, (k, v)))
    thread = ModelThread()
    engine = PrefillEngine(tiny, thread, ChunkGeometry(16, 2, 4096), None, False,
                           PrefillMetrics.create(CollectorRegistry(), thread, lambda: 0))
    call = RecordingCall()
    try:
        events = [event async for event in engine.run(PrefillJob("placed", prompt, Sampling(temperature=0.0),
                                                                 _sink(call), False, chunk_tokens=64))]
    finally:
        await engine.close()
        thread.shutdown()
    layout = call.messages[0][0]
    assert isinstance(layout, KvLayout) and layout.chunk_tokens == 64 and isinstance(events[-1], PrefillSummary)
    expected = {}
    for group in range(layout.layer_groups):
        members = range(group * layout.chunk_layers, min((group + 1) * layout.chunk_layers, layout.num_layers))
        keys, values = (torch.stack([layers[i][part] for i in members]) for part in (0, 1))
        expected |= {i: bytes(encode_chunk(layout, i, keys, values).data) for i in layout.group_chunks(group)}
    slices = [written for _, written in call.messages if written is not None]
    assert len(slices) == layout.chunk_count == layout.layer_groups  # one 40-token chunk per layer group
    assert _in_segment(call, expected)


@pytest.mark.parametrize(("encoding", "asked", "expected"), [
    (RAW_ENCODING, 10**9, "cap"),  # at most OWN_CHUNK_BYTES a chunk
    (RAW_ENCODING, 8, 8),  # fewer tokens than --kv-chunk-tokens: as asked
    (FP8_ENCODING, 64, 16)])  # fp8's scales are per chunk: --kv-chunk-tokens
async def test_a_transports_own_chunk_length_is_capped_and_raw_only(tiny: ModelRuntime, encoding: str, asked: int,
                                                                    expected: int | str) -> None:
    thread = ModelThread()
    engine = PrefillEngine(tiny, thread, ChunkGeometry(16, 2, 4096, encoding), None, False,
                           PrefillMetrics.create(CollectorRegistry(), thread, lambda: 0))
    call = RecordingCall()
    try:
        async for _ in engine.run(PrefillJob(f"own-{encoding}-{asked}", list(range(10, 50)),
                                             Sampling(temperature=0.0), _sink(call), False, chunk_tokens=asked)):
            pass
    finally:
        await engine.close()
        thread.shutdown()
    layout = call.messages[0][0]
    assert isinstance(layout, KvLayout)
    token_bytes = tiny.geometry.kv_bytes_per_token // tiny.geometry.num_layers * 2
    assert layout.chunk_tokens == (OWN_CHUNK_BYTES // token_bytes if expected == "cap" else expected)


def test_a_failed_placement_leaves_no_view_of_the_segment() -> None:
    """The exception of a failed `place` may live on (a task's result, a reference cycle): its
    frames must not keep a view of the segment, or closing it fails and its pages stay mapped."""
    writer = ShmTransferWriter.create(PREFIX, LAYOUT)
    good = ChunkSource(LAYOUT, 0, KEYS[:1], -KEYS[:1])
    bad = dataclasses.replace(good, values=-KEYS[:1, :, :, :2])  # the same byte length asked, wrong shape
    with pytest.raises(ValueError, match="do not make chunk 0") as failure:
        writer.place(bad, writer.claim_source(good))
    segment = writer.unlink()
    assert segment is not None and failure.value is not None  # the exception is still alive here
    segment.close()  # BufferError if a view of it were left
