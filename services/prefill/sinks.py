"""Where a prefill sends a request's KV transfer: the decode worker's TransferKv stream (chunks
inline, or only the layout and end when the chunks go to the kvstore) and/or the kvstore. A sink
takes the layout, the chunks in order and the end; it never blocks the model."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import grpc

from services.common.client_stream import ServerStatus
from services.common.errors import BackendUnavailable, UpstreamError, call_status
from services.common.kv_codec import ChunkSource, KvChunk, KvEnd, KvLayout
from services.common.kv_wire import KvMessage, key_of, wire_bytes
from services.common.kvstore_client import KvStoreClient
from services.common.tasks import TaskSet

log = logging.getLogger(__name__)
DECODE_ROLE = "decode"
KVSTORE_ROLE = "kvstore"


class KvSink(Protocol):
    async def place(self, source: ChunkSource) -> KvChunk | None:
        """The chunk encoded straight into this sink's own buffer, ready for `send` (a transfer's
        only sink may); None: the sink sends the bytes `source.encode()` gives."""
        ...

    async def send(self, message: KvLayout | KvChunk) -> None: ...

    async def close(self, end: KvEnd) -> None: ...

    def abort(self) -> None: ...


class DecodeStreamSink:
    """Streams the transfer to a decode worker over one TransferKv call. Whatever the decode worker
    answers or does (refuses, dies, is unreachable) surfaces as an UpstreamError naming the decode
    role, so the gateway does not blame this prefill worker for it. Messages go out as `wire_bytes`
    (`transfer_kv` is kv_wire.transfer_kv_bytes of the decode's channel): a chunk's data is copied
    once on its way to gRPC."""

    transport = "grpc"  # how the chunk bytes travel (ShmStreamSink may switch to "shm")

    def __init__(self, transfer_kv: grpc.aio.StreamUnaryMultiCallable, timeout_seconds: float,
                 chunks: bool = True) -> None:
        self._transfer_kv = transfer_kv
        self._timeout = timeout_seconds
        self._chunks = chunks  # False: the chunks go to the kvstore; the stream announces them
        self._opened: grpc.aio.StreamUnaryCall | None = None
        self._status: ServerStatus | None = None  # the decode's status, which grpc.aio may lose (client_stream)

    @property
    def _call(self) -> grpc.aio.StreamUnaryCall:
        """The TransferKv call, opened by the first message (nothing is opened for a refused job)."""
        if self._opened is None:
            self._opened = self._transfer_kv(timeout=self._timeout)
            self._status = ServerStatus(self._opened)
        return self._opened

    async def place(self, source: ChunkSource) -> KvChunk | None:
        return None

    def chunk_tokens(self) -> int:
        """Tokens per KV chunk this transfer's transport asks for (0: the worker's --kv-chunk-tokens)."""
        return 0

    async def send(self, message: KvLayout | KvChunk) -> None:
        if self._chunks or not isinstance(message, KvChunk):
            await self._write(message)

    async def close(self, end: KvEnd) -> None:
        await self._write(end)
        try:
            await self._call.done_writing()
            await self._call  # the decode's verdict on the whole transfer
        except grpc.aio.AioRpcError as error:
            raise self._fault(error) from None

    async def _write(self, message: KvMessage) -> None:
        try:
            await self._call.write(wire_bytes(message))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            try:
                await self._call  # the decode ended the call: surface its status
            except grpc.aio.AioRpcError as error:
                raise self._fault(error) from None
            raise UpstreamError(grpc.StatusCode.INTERNAL, "closed the KV stream early", DECODE_ROLE) from None

    def _fault(self, error: grpc.aio.AioRpcError) -> UpstreamError:
        return _decode_fault(self._status.error(error) if self._status is not None else error)

    def abort(self) -> None:
        if self._opened is not None and not self._opened.done():
            self._opened.cancel()


def _decode_fault(error: grpc.aio.AioRpcError) -> UpstreamError:
    return UpstreamError(*call_status(error), DECODE_ROLE)


class KvStoreSink:
    """Writes the transfer to the kvstore under `prefix`, one key per message, the end last. Unless
    the decode worker acknowledged the transfer (`keep`: from then on the keys are the decode's to
    delete), aborting deletes what it wrote, in the background: a decode that already gave up on the
    request (cancelled, KV deadline) deleted its keys before these were written."""

    def __init__(self, store: KvStoreClient, prefix: str, tasks: TaskSet) -> None:
        self._store = store
        self._prefix = prefix
        self._tasks = tasks
        self._kept = False

    async def place(self, source: ChunkSource) -> KvChunk | None:
        return None

    async def send(self, message: KvLayout | KvChunk) -> None:
        await self._put(message)

    async def close(self, end: KvEnd) -> None:
        await self._put(end)

    def keep(self) -> None:
        """The decode worker acknowledged the transfer: it owns (and will delete) the keys."""
        self._kept = True

    async def _put(self, message: KvMessage) -> None:
        try:
            await self._store.put(key_of(self._prefix, message), wire_bytes(message))
        except BackendUnavailable as error:  # the kvstore's fault, not this prefill worker's
            raise UpstreamError(grpc.StatusCode.UNAVAILABLE, str(error), KVSTORE_ROLE) from None

    def abort(self) -> None:
        if not self._kept:
            self._tasks.spawn(self._delete(), f"delete-{self._prefix}")

    async def _delete(self) -> None:
        try:
            await self._store.delete_prefix(self._prefix)
        except Exception as error:  # noqa: BLE001 - best effort; the TTL is the backstop
            log.debug("could not delete the partial transfer %s: %s", self._prefix, error)


class BestEffortSink:
    """Wraps an optional kvstore sink (a checkpoint): its first failure is logged and it goes quiet."""

    def __init__(self, inner: KvStoreSink, what: str) -> None:
        self._inner = inner
        self._failed = False
        self._what = what

    async def place(self, source: ChunkSource) -> KvChunk | None:
        return None

    async def send(self, message: KvLayout | KvChunk) -> None:
        if not self._failed:
            try:
                await self._inner.send(message)
            except Exception as exc:  # noqa: BLE001 - optional path: log and carry on
                self._give_up(exc)

    async def close(self, end: KvEnd) -> None:
        if not self._failed:
            try:
                await self._inner.close(end)
            except Exception as exc:  # noqa: BLE001 - optional path: log and carry on
                self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        log.warning("%s failed, continuing without it: %s", self._what, exc)
        self._failed = True
        self._inner.abort()  # deletes what it wrote

    @property
    def ok(self) -> bool:
        return not self._failed

    def keep(self) -> None:
        self._inner.keep()

    def abort(self) -> None:
        if not self._failed:
            self._inner.abort()
