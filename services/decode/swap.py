"""Moving a sequence's KV between the pool and the kvstore: loading a prefill's stored transfer,
and swapping a preempted sequence out and back in. Stored KV uses the wire format of a transfer
(layout, chunks, end), so loading always goes through the same verification, and every write into
the pool goes through the sequence's lease."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from services.common.errors import BackendUnavailable, KvProtocolError, RequestCancelled, ServiceError
from services.common.kv_assembly import AssemblyLimits, KvAssembler, KvReceipt
from services.common.kv_codec import KvChunk, KvEnd, KvLayout, encode_chunk
from services.common.kv_wire import KvMessage, chunk_key, end_key, key_of, layout_key, parse_stored, \
    request_prefix, swap_prefix, wire_bytes
from services.common.kvstore_client import KvStoreClient
from services.common.model_thread import ModelThread
from services.common.runtime import ModelRuntime
from services.decode.blocks import LeasedWriter
from services.decode.local_prefill import seeded_cache
from services.decode.pool import BlockPool
from services.decode.sequence import Sequence

log = logging.getLogger(__name__)


class KvSwapper:
    def __init__(self, runtime: ModelRuntime, thread: ModelThread, pool: BlockPool, store: KvStoreClient | None,
                 limits: AssemblyLimits) -> None:
        self._runtime = runtime
        self._thread = thread
        self._pool = pool
        self._store = store
        self._limits = limits

    @property
    def has_store(self) -> bool:
        return self._store is not None

    def _require_store(self) -> KvStoreClient:
        if self._store is None:
            raise BackendUnavailable("this decode worker has no kvstore (--kvstore-address)")
        return self._store

    async def load(self, prefix: str, assembler: KvAssembler) -> KvReceipt:
        """Feed the transfer stored under `prefix` through `assembler` (verifying every message)."""
        store = self._require_store()
        layout = _expect(parse_stored(await store.get(layout_key(prefix))), KvLayout)
        end = _expect(parse_stored(await store.get(end_key(prefix))), KvEnd)
        assembler.accept_layout(layout)
        for index in range(layout.chunk_count):
            assembler.accept_chunk(_expect(parse_stored(await store.get(chunk_key(prefix, index))), KvChunk))
        return assembler.finish(end)

    def copy_out(self, sequence: Sequence, table: list[int]) -> list[KvMessage]:
        """The sequence's KV as a transfer (runs on the model thread, before the step that may
        reuse its blocks)."""
        g, tokens = self._runtime.geometry, sequence.kv_tokens
        kv = [self._pool.read(table, layer, tokens) for layer in range(g.num_layers)]
        keys, values = torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])
        layout = KvLayout(sequence.request_id, g.fingerprint, g.num_layers, g.num_kv_heads, g.head_dim, tokens,
                          max(1, self._limits.max_chunk_bytes // g.kv_bytes_per_token), g.num_layers, g.dtype)
        chunks = [encode_chunk(layout, index, keys, values) for index in range(layout.chunk_count)]
        return [layout, *chunks, KvEnd(layout.request_id, layout.chunk_count, sequence.generated[-1])]

    async def swap_out(self, sequence: Sequence, messages: list[KvMessage], wanted: Callable[[], bool]) -> bool:
        """Store copied-out KV; True if it is in the kvstore (False: it will be recomputed). Stops
        writing the moment the sequence no longer wants it (`wanted`), so a released sequence
        leaves no keys behind its cleanup."""
        if self._store is None:
            return False
        prefix = swap_prefix(sequence.store_id, sequence.swaps)
        for message in messages:
            if not wanted():
                return False
            await self._store.put(key_of(prefix, message), wire_bytes(message))
        return True

    async def swap_in(self, sequence: Sequence, writer: LeasedWriter, table: list[int]) -> None:
        """Put the sequence's KV back into its freshly leased blocks (`table`; the first
        `cached_tokens` shared from the prefix cache): from the kvstore (verified) or, when it was
        not swapped or cannot be read back, by recomputing prompt + generated tokens after them."""
        if sequence.swapped and self._store is not None:
            assembler = KvAssembler(sequence.request_id, self._runtime.geometry, sequence.kv_tokens, self._limits,
                                    writer)
            prefix = swap_prefix(sequence.store_id, sequence.swaps)
            try:
                await self.load(prefix, assembler)
                await self._delete(prefix)  # back in the pool: the stored copy has served its purpose
                return
            except RequestCancelled:
                raise
            except ServiceError as error:  # missing, evicted, unreachable or corrupt: recompute instead
                log.warning("swap-in of %s failed (%s); recomputing its KV", sequence.request_id, error)
        tokens, held = sequence.prompt_ids + sequence.generated[:-1], sequence.cached_tokens
        await self._thread.run(self._recompute, tokens, held, table, writer)

    def _recompute(self, tokens: list[int], held: int, table: list[int], writer: LeasedWriter) -> None:
        """On the model thread: the KV of `tokens` after the first `held`, on theirs from the pool."""
        if held >= len(tokens):  # preempted at its first token, its prompt all whole cached blocks
            return
        cache = seeded_cache(self._runtime, self._pool, table, held)
        self._runtime.prefill(tokens[held:], lambda layer, k, v: writer.write(layer, held, k, v), cache)

    async def forget(self, request_id: str) -> None:
        """Delete everything stored for the request (it also expires by TTL)."""
        await self._delete(request_prefix(request_id))

    async def _delete(self, prefix: str) -> None:
        if self._store is None:
            return
        try:
            await self._store.delete_prefix(prefix)
        except Exception as error:  # noqa: BLE001 - best effort; the TTL is the backstop
            log.debug("could not delete the stored KV under %s: %s", prefix, error)


M = TypeVar("M")


def _expect(message: object, kind: type[M]) -> M:
    if not isinstance(message, kind):
        raise KvProtocolError(f"stored KV message is a {type(message).__name__}, expected {kind.__name__}")
    return message
