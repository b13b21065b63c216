"""Where a prefill sends a request's KV transfer: a decode worker's TransferKv stream and/or the
kvstore. A sink takes the layout, the chunks in order and the end; it never blocks the model."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import grpc

from services.common.errors import KvProtocolError
from services.common.kv_codec import KvChunk, KvEnd, KvLayout
from services.common.kv_wire import KvMessage, key_of, to_pb
from services.common.kvstore_client import KvStoreClient
from services.common.pb import decode_pb2_grpc

log = logging.getLogger(__name__)


class KvSink(Protocol):
    async def send(self, message: KvLayout | KvChunk) -> None: ...

    async def close(self, end: KvEnd) -> None: ...

    def abort(self) -> None: ...


class DecodeStreamSink:
    """Streams the transfer to a decode worker over one TransferKv call."""

    def __init__(self, stub: decode_pb2_grpc.DecodeServiceStub, timeout_seconds: float) -> None:
        self._call = stub.TransferKv(timeout=timeout_seconds)

    async def send(self, message: KvLayout | KvChunk) -> None:
        await self._write(message)

    async def close(self, end: KvEnd) -> None:
        await self._write(end)
        await self._call.done_writing()
        await self._call  # raises AioRpcError with the decode's status if it refused the KV

    async def _write(self, message: KvMessage) -> None:
        try:
            await self._call.write(to_pb(message))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._call  # the decode ended the call: surface its status
            raise KvProtocolError("decode worker closed the KV stream early") from None

    def abort(self) -> None:
        if not self._call.done():
            self._call.cancel()


class KvStoreSink:
    """Writes the transfer to the kvstore, one key per message; the end is written last."""

    def __init__(self, store: KvStoreClient) -> None:
        self._store = store

    async def send(self, message: KvLayout | KvChunk) -> None:
        await self._store.put(key_of(message), to_pb(message).SerializeToString())

    async def close(self, end: KvEnd) -> None:
        await self._store.put(key_of(end), to_pb(end).SerializeToString())

    def abort(self) -> None:
        """Nothing to undo: a partial transfer has no end key and expires with its TTL."""


class BestEffortSink:
    """Wraps an optional sink (a checkpoint): its first failure is logged and it goes quiet."""

    def __init__(self, inner: KvSink, what: str) -> None:
        self._inner: KvSink | None = inner
        self._what = what

    async def send(self, message: KvLayout | KvChunk) -> None:
        if self._inner is not None:
            try:
                await self._inner.send(message)
            except Exception as exc:  # noqa: BLE001 - optional path: log and carry on
                self._give_up(exc)

    async def close(self, end: KvEnd) -> None:
        if self._inner is not None:
            try:
                await self._inner.close(end)
            except Exception as exc:  # noqa: BLE001 - optional path: log and carry on
                self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        log.warning("%s failed, continuing without it: %s", self._what, exc)
        self._inner = None

    @property
    def ok(self) -> bool:
        return self._inner is not None

    def abort(self) -> None:
        if self._inner is not None:
            self._inner.abort()
