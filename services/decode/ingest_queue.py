"""The verify-and-store half of receiving a KV transfer, in one thread of its own per transfer.

The event loop parses each chunk message and admits it (`KvAssembler.admit_chunk`: the cheap
checks, in arrival order), then queues it here; the transfer's thread takes the queued chunks in
order and verifies and stores each (`verify_and_store`: checksum, finiteness, the pool write).
The loop does not wait for a chunk's verdict before it reads the next message, and the thread goes
from one queued chunk to the next without a round trip through the loop (which had cost ~0.3 ms
a chunk on a busy 2-core machine). The first failure stops the thread's work: later chunks are
dropped, and the failure is the transfer's (it comes before any later message's own fault).

The thread is the transfer's own, not the loop's shared executor: it waits for chunks as long as
the transfer lasts (a prefill sends them while its forward pass runs), and concurrent transfers
must not take every worker of the executor that everything else runs on."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable

from services.common.errors import KvCorrupted
from services.common.kv_assembly import KvAssembler
from services.common.kv_codec import ChunkSpan, KvChunk

_Item = tuple[KvChunk, ChunkSpan] | None  # None: no more chunks
# Chunks admitted but not yet stored, at most: the sender waits (gRPC flow control) beyond it, so
# a transfer verified slower than it arrives holds a few chunks' bytes, not all of them.
QUEUED_CHUNKS = 4
# How long the thread waits for the next chunk before it gives up on the transfer: a bound for a
# handler that never closed its queue (it always does); the transfer's own deadline is far shorter.
IDLE_SECONDS = 600.0


class IngestQueue:
    """Admitted chunks of one transfer, verified and stored in order by the transfer's thread.
    `put` waits while QUEUED_CHUNKS are queued; `drained` ends once every chunk put before
    `close` is stored, or with the first chunk's failure; `finished` once the thread has ended
    (no chunk's bytes are read after it). Always `close` it: the thread waits for the end."""

    def __init__(self, assembler: KvAssembler) -> None:
        self._assembler = assembler
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._room = asyncio.Semaphore(QUEUED_CHUNKS)
        self._failure: BaseException | None = None
        self._stopped = False
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self.drained: asyncio.Future[None] = self._loop.create_future()
        self.finished: asyncio.Future[None] = self._loop.create_future()
        threading.Thread(target=self._run, name="kv-ingest", daemon=True).start()

    async def put(self, chunk: KvChunk, span: ChunkSpan) -> None:
        """Queue an admitted chunk; raises an earlier chunk's failure instead, if one failed."""
        await self._room.acquire()
        if self._failure is not None:
            self._room.release()
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

    def _run(self) -> None:
        try:
            self._drain()
        except queue.Empty:
            self._failure = KvCorrupted(f"KV transfer: no chunk for {IDLE_SECONDS:.0f} s")
        except BaseException as error:  # not a chunk's verdict: still the transfer's end
            self._failure = error.with_traceback(None)
        finally:
            self._call(self._report)

    def _drain(self) -> None:
        while (item := self._queue.get(timeout=IDLE_SECONDS)) is not None:
            if self._failure is None and not self._stopped:
                try:
                    self._assembler.verify_and_store(*item)
                except Exception as error:  # the transfer's failure, reported by put or drained
                    self._failure = error.with_traceback(None)  # its frames would hold the chunk's bytes
            del item
            self._call(self._room.release)

    def _call(self, callback: Callable[[], None]) -> None:
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: the process is ending, no one waits
            pass

    def _report(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)
        if self.drained.done():  # cancelled by a cancelled waiter
            return
        if self._failure is not None:
            self.drained.set_exception(self._failure)
        else:
            self.drained.set_result(None)
