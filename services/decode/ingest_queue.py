"""The verify-and-store half of receiving a KV transfer, in one worker thread per transfer.

The event loop parses each chunk message and admits it (`KvAssembler.admit_chunk`: the cheap
checks, in arrival order), then queues it here; one worker thread takes the queued chunks in
order and verifies and stores each (`verify_and_store`: checksum, finiteness, the pool write).
The loop never waits for a chunk's verdict before it reads the next message, and the thread goes
from one queued chunk to the next without a round trip through the loop (which had cost ~0.3 ms
a chunk on a busy 2-core machine). The first failure stops the thread's work: later chunks are
dropped, and the failure is the transfer's (it comes before any later message's own fault)."""

from __future__ import annotations

import asyncio
import queue

from services.common.kv_assembly import KvAssembler
from services.common.kv_codec import ChunkSpan, KvChunk

_Item = tuple[KvChunk, ChunkSpan] | None  # None: no more chunks


class IngestQueue:
    """Admitted chunks of one transfer, verified and stored in order by one worker thread. `put`
    never blocks; `drained` ends once every chunk put before `close` is stored, or with the first
    chunk's failure. Always `close` it: its thread waits for the end of the queue."""

    def __init__(self, assembler: KvAssembler) -> None:
        self._assembler = assembler
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._failure: BaseException | None = None
        self._stopped = False
        self._closed = False
        self.drained: asyncio.Future[None] = asyncio.get_running_loop().run_in_executor(None, self._drain)

    def put(self, chunk: KvChunk, span: ChunkSpan) -> None:
        """Queue an admitted chunk; raises an earlier chunk's failure instead, if one failed."""
        if self._failure is not None:
            raise self._failure
        self._queue.put((chunk, span))

    def close(self, stop: bool = False) -> asyncio.Future[None]:
        """No more chunks (idempotent); with `stop`, chunks not yet stored are dropped (the
        transfer failed or was cancelled). Returns `drained`."""
        self._stopped = self._stopped or stop
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        return self.drained

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._failure is None and not self._stopped:
                try:
                    self._assembler.verify_and_store(*item)
                except Exception as error:  # the transfer's failure, reported by put or drained
                    self._failure = error
        if self._failure is not None:
            raise self._failure
