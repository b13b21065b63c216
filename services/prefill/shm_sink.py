"""The decode stream sink with the shared-memory transport (`--kv-transport auto|shm`): the
layout, chunk slices and end travel on the TransferKv stream, the chunk bytes through one
segment this prefill creates for the transfer (services.common.kv_shm). The decode reported its
host identity when it admitted the request (Accepted.kv_shm_host, relayed in the PrefillRequest);
`auto` sends the chunks inline when it differs from this host's, is empty (the decode refuses
shared memory), or /dev/shm has no room."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging

import grpc

from services.common import shm
from services.common.errors import CapacityExhausted, TransportUnavailable
from services.common.kv_codec import RAW_ENCODING, ChunkSource, KvChunk, KvEnd, KvLayout
from services.common.kv_shm import ShmTransferWriter, ShmTransport, choose_transport
from services.prefill.sinks import DecodeStreamSink

log = logging.getLogger(__name__)
COPIES_AHEAD = 1  # chunks whose copy or slice may still be on its way when send returns


class ShmStreamSink(DecodeStreamSink):
    """A DecodeStreamSink whose chunks go through shared memory when the transport allows it. The
    segment is unlinked when the decode acknowledges (close) or the transfer fails, is cancelled
    or runs out its deadline (abort, which the prefill engine always calls)."""

    def __init__(self, transfer_kv: grpc.aio.StreamUnaryMultiCallable, timeout_seconds: float,
                 transport: ShmTransport, decode_host: str) -> None:
        super().__init__(transfer_kv, timeout_seconds)
        self._transport = transport
        self._decode_host = decode_host
        self._writer: ShmTransferWriter | None = None
        self._slices: collections.deque[asyncio.Task[None]] = collections.deque()  # chunks on their way

    def chunk_tokens(self) -> int:
        """Larger chunks through shared memory: their bytes are in no message, and each chunk costs
        both ends a control message and a hop to a worker thread (see --kv-shm-chunk-tokens)."""
        try:
            chosen = choose_transport(self._transport.mode, self._transport.host_identity, self._decode_host)
        except TransportUnavailable:  # refused when the transfer opens (_open)
            return 0
        return self._transport.chunk_tokens if chosen == "shm" else 0

    async def place(self, source: ChunkSource) -> KvChunk | None:
        """A raw chunk is encoded straight into its place in the segment, in a worker thread:
        one copy of its values, not two (encode to bytes, then `send`'s copy into the segment)."""
        if self._writer is None or source.layout.encoding != RAW_ENCODING:
            return None
        where = self._writer.claim_source(source)
        return await asyncio.to_thread(self._writer.place, source, where)

    async def send(self, message: KvLayout | KvChunk) -> None:
        """A chunk's slice goes out as soon as its bytes are in the segment and the slices before
        it are out (each in a task of its own, chained in chunk order). A chunk `place` put there
        is already in; an encoded one (fp8) is copied there in a worker thread, and `send` returns
        once at most COPIES_AHEAD chunks are on their way, so copying a chunk overlaps encoding the
        next one. `close` waits for the rest; after a failed or cancelled `send`, only `abort`."""
        if isinstance(message, KvLayout):
            await self._write(await self._open(message))
        elif self._writer is None:
            await self._write(message)
        else:
            copying: asyncio.Future[None] | None = None
            described = message
            if message.shm is None:
                described = self._writer.claim(message)
                copying = asyncio.ensure_future(asyncio.to_thread(self._writer.fill, message, described))
                copying.add_done_callback(_retrieved)
            previous = self._slices[-1] if self._slices else None
            sending = asyncio.ensure_future(self._send_slice(previous, copying, described))
            sending.add_done_callback(_retrieved)
            self._slices.append(sending)
            while len(self._slices) > COPIES_AHEAD:
                await self._slices.popleft()

    async def _send_slice(self, previous: asyncio.Task[None] | None, copying: asyncio.Future[None] | None,
                          described: KvChunk) -> None:
        if previous is not None:
            await previous  # its failure is this one's too: nothing goes out after a lost slice
        if copying is not None:
            await copying
        await self._write(described)

    async def _open(self, layout: KvLayout) -> KvLayout:
        if choose_transport(self._transport.mode, self._transport.host_identity, self._decode_host) != "shm":
            return layout
        try:
            self._writer = ShmTransferWriter.create(self._transport.prefix, layout, reserve=False)
            await asyncio.to_thread(self._writer.reserve)  # a few ms for a long prompt: off the event loop
        except OSError as error:  # /dev/shm full (a container's is 64 MB unless raised)
            self._release()
            self._writer = None
            if self._transport.mode == "shm":
                raise CapacityExhausted(f"no shared memory for the KV transfer: {error}") from None
            log.warning("no shared memory for the KV transfer (%s): sending it inline", error)
            return layout
        self.transport = "shm"
        return dataclasses.replace(layout, shm_segment=self._writer.name)

    async def close(self, end: KvEnd) -> None:
        try:
            while self._slices:
                await self._slices.popleft()
            await super().close(end)  # returns once the decode acknowledged the verified KV
        finally:
            self._release()

    def abort(self) -> None:
        super().abort()
        for sending in self._slices:  # a copy already running ends on its own; the mapping waits for it
            sending.cancel()
        self._slices.clear()
        self._release()

    def _release(self) -> None:
        mapping = self._writer.unlink() if self._writer is not None else None
        if mapping is not None:
            # Unmapping frees the segment's pages (~30 ms for 94 MB): not on the event loop, nor in
            # the handoff. The default executor finishes it even while the process shuts down.
            try:
                asyncio.get_running_loop().run_in_executor(None, shm.close, mapping)
            except RuntimeError:  # no event loop (a sink dropped at exit): close it here
                shm.close(mapping)


def _retrieved(task: asyncio.Task[None]) -> None:
    """A copy's or a slice's failure is the transfer's, reported by whoever awaits it (the next
    send, close); one abandoned by abort is retrieved here, logged at debug, so it is not lost."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("a KV chunk on its way through shared memory failed: %r", task.exception())
