"""The shared-memory KV transport: for a prefill and a decode on one host, the chunk bytes of a
transfer go through one POSIX shared-memory segment instead of the TransferKv stream. The stream
still carries the control: the layout names the segment, each chunk carries its slice (offset,
length) with its byte_length and checksum, the end closes the transfer.

The prefill creates the segment for one transfer, writes each chunk into it (push) before sending
the chunk's slice, and unlinks it when the decode acknowledges, the transfer fails or times out
(a killed prefill's segments are reaped by `services.common.shm.reap_orphans`). The decode only
maps the segment, checks each slice and hands the mapped bytes to the KvAssembler, which verifies
them (checksum, shape, finiteness) exactly as inline bytes and copies them into the pool; once the
call has ended it releases those bytes and unmaps the segment.

Segment layout: a header (magic, transfer attempt, request id) binds the segment to one
transfer, so a layout naming another request's segment is refused; then the chunks, each at a
64-byte aligned offset.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import traceback
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import cast

import numpy as np

from services.common import shm
from services.common.errors import KvProtocolError, TransportUnavailable, UnknownRequest
from services.common.kv_codec import ChunkSource, KvChunk, KvLayout, ShmSlice, value_bytes
from services.common.kv_wire import KvMessage

TRANSPORTS = ("auto", "grpc", "shm")
# Tokens per chunk through shared memory (--kv-shm-chunk-tokens): its bytes ride in no message, so
# fewer, larger chunks only save control messages and hops to worker threads at both ends.
SHM_CHUNK_TOKENS = 2048
MAGIC = b"DISAGGKV"
HEADER_BYTES = 128  # magic, attempt, request id (at most 64 bytes): room to spare
_HEADER = struct.Struct("<8sIH")
_ALIGN = 64


@dataclass(frozen=True, slots=True)
class ShmTransport:
    """A prefill's choice of transport: `mode` auto, grpc or shm; segments named with `prefix`;
    `chunk_tokens` per KV chunk of a transfer through shared memory (0: the worker's usual)."""

    mode: str
    prefix: str
    host_identity: str
    chunk_tokens: int = 0


def choose_transport(mode: str, own_host: str, decode_host: str) -> str:
    """'shm' or 'grpc' for a transfer to a decode that reported `decode_host` at admission
    (Accepted.kv_shm_host; empty: it does not accept shared memory). Forcing shm where it cannot
    work is TransportUnavailable (FAILED_PRECONDITION), never a silent fallback."""
    same_host = bool(decode_host) and decode_host == own_host
    if mode == "grpc":
        return "grpc"
    if mode == "shm" and not same_host:
        why = "refuses shared memory" if not decode_host else "runs on another host"
        raise TransportUnavailable(f"--kv-transport shm, but the decode worker {why}")
    return "shm" if same_host else "grpc"


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def _header(request_id: str, attempt: int) -> bytes:
    name = request_id.encode()
    return _HEADER.pack(MAGIC, attempt, len(name)) + name


def segment_bytes(layout: KvLayout) -> int:
    """Size of the segment holding every chunk of `layout` (header and alignment included)."""
    itemsize = value_bytes(layout)
    total = HEADER_BYTES
    for index in range(layout.chunk_count):
        shape = layout.shape(layout.span(index))
        total = _aligned(total) + int(np.prod(shape)) * itemsize
    return total


def _mapped(segment: SharedMemory) -> memoryview:
    """The segment's mapping. Typeshed has `buf` Optional (None once closed); every caller holds the
    segment open (unchanged: indexing a closed one's None raises TypeError as before)."""
    return cast(memoryview, segment.buf)


class ShmTransferWriter:
    """The prefill's side of one transfer: its segment, filled chunk by chunk."""

    def __init__(self, segment: SharedMemory, layout: KvLayout) -> None:
        self._segment: SharedMemory | None = segment
        self.name = segment.name
        self._size = segment.size
        self._next = HEADER_BYTES
        self._header = _header(layout.request_id, layout.transfer_attempt)
        self._reserved = False

    @classmethod
    def create(cls, prefix: str, layout: KvLayout, reserve: bool = True) -> ShmTransferWriter:
        """A segment for `layout`, reserved unless `reserve` is False (then call `reserve` before
        the first `put`); OSError when /dev/shm has no room for it."""
        writer = cls(shm.create(prefix, segment_bytes(layout)), layout)
        if reserve:
            try:
                writer.reserve()
            except OSError:
                writer.destroy()
                raise
        return writer

    def reserve(self) -> None:
        """Allocate the segment's pages, map them, and write its header (blocking: ~45 ms for a
        2,048-token prompt of the default model, while its forward pass runs; OSError when /dev/shm
        is full). Nothing touches a page before: no SIGBUS. Mapped here, the chunks' writes later
        take no page fault (measured: 6 ms for 94 MB instead of 30). The decode maps them for reading
        as soon as the layout names the segment (ShmReceiver)."""
        segment = self._require()
        shm.allocate(segment)
        shm.map_for_writing(segment)
        _mapped(segment)[: len(self._header)] = self._header
        self._reserved = True

    def _require(self) -> SharedMemory:
        if self._segment is None:  # released (the transfer ended) while a chunk was on its way
            raise TransportUnavailable(f"shared-memory segment {self.name} was already released")
        return self._segment

    def put(self, chunk: KvChunk) -> KvChunk:
        """Copy the chunk's bytes into the segment (blocking: run it off the event loop) and return
        the chunk as it travels: its slice instead of its bytes."""
        described = self.claim(chunk)
        self.fill(chunk, described)
        return described

    def claim(self, chunk: KvChunk) -> KvChunk:
        """Take the chunk's place in the segment (on the event loop, in chunk order) and return the
        chunk as it travels once `fill` has copied its bytes there."""
        return dataclasses.replace(chunk, data=b"", shm=self._take(chunk.index, chunk.byte_length))

    def _take(self, index: int, byte_length: int) -> ShmSlice:
        self._require()
        if not self._reserved:
            raise TransportUnavailable(f"shared-memory segment {self.name} is not reserved yet")
        offset = _aligned(self._next)
        if offset + byte_length > self._size:
            raise KvProtocolError(f"KV chunk {index} does not fit the transfer's segment")
        self._next = offset + byte_length
        return ShmSlice(self.name, offset, byte_length)

    def claim_source(self, source: ChunkSource) -> ShmSlice:
        """Take the place of a chunk that `place` will encode there (on the event loop, in chunk order)."""
        return self._take(source.index, source.byte_length)

    def place(self, source: ChunkSource, where: ShmSlice) -> KvChunk:
        """Encode the chunk straight into the place `claim_source` gave it (blocking: run it off the
        event loop) and return it as it travels: its slice instead of its bytes. One copy, where
        encoding to bytes and `fill` take two."""
        target = _mapped(self._require())[where.offset : where.offset + where.length]
        try:
            return dataclasses.replace(source.encode_into(target), data=b"", shm=where)
        except BaseException as error:
            # The failed frames hold views of the segment: cleared, they cannot keep it mapped (the
            # exception may live on in a reference cycle until the garbage collector runs).
            traceback.clear_frames(error.__traceback__)
            raise
        finally:
            del target

    def fill(self, chunk: KvChunk, described: KvChunk) -> None:
        """Copy the chunk's bytes to the place `claim` gave it (blocking: run it off the event loop;
        chunks of claimed places may be copied at the same time)."""
        segment = self._require()
        if described.shm is None:
            raise ValueError("fill takes the chunk claim returned")
        target = np.frombuffer(_mapped(segment), np.uint8, count=chunk.byte_length, offset=described.shm.offset)
        try:
            target[:] = np.frombuffer(chunk.data, np.uint8)  # numpy copies without holding the GIL
        finally:
            del target  # an export left alive (in a failure's traceback) would keep the segment mapped

    def destroy(self) -> None:
        """Unlink and unmap the segment (idempotent): the transfer was acknowledged, failed or timed out."""
        segment = self.unlink()
        if segment is not None:
            shm.close(segment)

    def unlink(self) -> SharedMemory | None:
        """Unlink the segment's name (idempotent, fast) and hand over its mapping, which the caller
        closes with `shm.close` (that frees the pages: ~30 ms for 94 MB, work for a thread)."""
        segment, self._segment = self._segment, None
        if segment is not None:
            shm.unlink_segment(segment)
        return segment


class ShmReceiver:
    """The decode's side of one transfer: maps the layout's segment (if it names one) and turns
    each chunk's slice into its mapped bytes, refusing slices that do not belong to the transfer.

    `map_ahead` maps the segment's pages in a worker thread: the prefill reserved them before it
    sent the layout and writes the chunks while its forward pass runs, so reading them later takes
    no page fault (a read fault per 64 KB had cost ~5 ms of a 94 MB transfer). Call `release` when
    the transfer is over, best once its reply went: once the mapping ahead and every reader
    (`add_reader`: the thread that verifies and stores the chunks) are done, the chunks' views are
    released and the segment unmapped in a worker thread (never unlinked): nothing can read it
    after, and a view someone still holds (a failure's traceback) cannot keep it mapped."""

    def __init__(self, layout: KvLayout, accept_shm: bool) -> None:
        self._layout = layout
        self._segment: SharedMemory | None = None
        self._users: list[asyncio.Future[None]] = []  # what must end before the mapping closes
        self._views: list[memoryview] = []  # handed out by resolve: released before the mapping closes
        self._released = False
        if layout.shm_segment:
            if not accept_shm:
                raise TransportUnavailable("this decode worker does not accept shared-memory KV transfers")
            self._segment = _attach(layout)

    def map_ahead(self) -> None:
        """Map the segment's pages for reading in a worker thread (once the layout is accepted)."""
        if self._segment is not None and not self._released:
            self.add_reader(asyncio.get_running_loop().run_in_executor(None, shm.map_for_reading, self._segment))

    def add_reader(self, done: asyncio.Future[None]) -> None:
        """The mapping stays until `done` (a future no one cancels) has ended."""
        self._users.append(done)

    def release(self) -> None:
        """Unmap the segment (idempotent) once the mapping ahead and the readers have ended."""
        if self._released:
            return
        self._released = True
        pending = [user for user in self._users if not user.done()]
        if pending:
            asyncio.gather(*pending, return_exceptions=True).add_done_callback(lambda _: self._close())
        else:
            self._close()

    def _close(self) -> None:
        segment, self._segment = self._segment, None
        if segment is None:
            return
        for view in self._views:  # no reader is left: whoever still holds a chunk holds a released view
            try:
                view.release()
            except BufferError:  # something made its own view of it: unmapped when that goes (shm.close)
                pass
        self._views.clear()
        asyncio.get_running_loop().run_in_executor(None, shm.close, segment)

    def resolve(self, message: KvMessage) -> KvMessage:
        """The message with a chunk's slice replaced by the bytes it names (others unchanged)."""
        if not isinstance(message, KvChunk):
            return message
        where = message.shm
        if self._segment is None:
            if where is not None:
                raise KvProtocolError(f"KV chunk {message.index} names a shared-memory slice, the layout no segment")
            return message
        if where is None or message.data:
            raise KvProtocolError(f"KV chunk {message.index} must carry a shared-memory slice and no inline bytes")
        if where.segment != self._layout.shm_segment:
            raise KvProtocolError(f"KV chunk {message.index} names segment {where.segment!r}, the transfer's is "
                                  f"{self._layout.shm_segment!r}")
        if where.offset < HEADER_BYTES or where.offset + where.length > self._segment.size:
            raise KvProtocolError(f"KV chunk {message.index} slice [{where.offset}, {where.offset + where.length}) "
                                  f"lies outside the segment's data [{HEADER_BYTES}, {self._segment.size})")
        if where.length != message.byte_length:
            raise KvProtocolError(f"KV chunk {message.index} slice holds {where.length} bytes, "
                                  f"it declares {message.byte_length}")
        view = _mapped(self._segment)[where.offset : where.offset + where.length]
        self._views.append(view)
        return dataclasses.replace(message, data=view)


def _attach(layout: KvLayout) -> SharedMemory:
    name = layout.shm_segment
    try:
        segment = shm.attach(name)
    except ValueError:
        raise KvProtocolError(f"{name!r} is not a shared-memory segment name of this project") from None
    except FileNotFoundError:
        raise UnknownRequest(f"shared-memory segment {name!r} does not exist") from None
    except OSError as error:
        raise TransportUnavailable(f"cannot map shared-memory segment {name!r}: {error}") from None
    expected = _header(layout.request_id, layout.transfer_attempt)
    if segment.size < HEADER_BYTES or bytes(_mapped(segment)[: len(expected)]) != expected:
        shm.close(segment)
        raise KvProtocolError(f"shared-memory segment {name!r} does not hold request {layout.request_id!r}'s "
                              f"transfer attempt {layout.transfer_attempt}")
    return segment
