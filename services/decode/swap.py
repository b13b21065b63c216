"""Moving a sequence's KV between the pool and the kvstore: loading a prefill's stored transfer,
and swapping a preempted sequence out and back in. Stored KV uses the wire format of a transfer
(layout, chunks, end), so loading always goes through the same verification."""

from __future__ import annotations

import logging

import torch

from services.common.errors import BackendUnavailable, KvProtocolError
from services.common.kv_codec import KvAssembler, KvChunk, KvEnd, KvLayout, KvReceipt, encode_chunk
from services.common.kv_wire import KvMessage, chunk_key, end_key, key_of, layout_key, parse_stored, to_pb, \
    transfer_prefix
from services.common.kvstore_client import KvStoreClient
from services.common.model_thread import ModelThread
from services.common.runtime import ModelRuntime
from services.decode.blocks import BlockManager, BlockPool
from services.decode.sequence import PoolTarget, Sequence

log = logging.getLogger(__name__)


def swap_id(request_id: str) -> str:
    return f"{request_id}.swap"


class KvSwapper:
    def __init__(self, runtime: ModelRuntime, thread: ModelThread, pool: BlockPool, blocks: BlockManager,
                 store: KvStoreClient | None, max_chunk_bytes: int) -> None:
        self._runtime = runtime
        self._thread = thread
        self._pool = pool
        self._blocks = blocks
        self._store = store
        self._max_chunk_bytes = max_chunk_bytes

    async def load(self, transfer_id: str, assembler: KvAssembler) -> KvReceipt:
        """Feed a stored transfer through `assembler` (verifying every message)."""
        if self._store is None:
            raise BackendUnavailable("this decode worker has no kvstore (--kvstore-address)")
        layout = _expect(parse_stored(await self._store.get(layout_key(transfer_id))), KvLayout)
        end = _expect(parse_stored(await self._store.get(end_key(transfer_id))), KvEnd)
        assembler.accept_layout(layout)
        for index in range(layout.chunk_count):
            assembler.accept_chunk(_expect(parse_stored(await self._store.get(chunk_key(transfer_id, index))),
                                           KvChunk))
        return assembler.finish(end)

    async def swap_out(self, sequence: Sequence) -> None:
        """Save the sequence's KV to the kvstore; without one it will be recomputed on resume."""
        if self._store is None:
            return
        messages = await self._thread.run(self._encode, sequence)
        try:
            for message in messages:
                await self._store.put(key_of(message), to_pb(message).SerializeToString())
        except Exception as error:  # noqa: BLE001 - recomputing is the fallback
            log.warning("swap-out of %s failed (%s); it will be recomputed", sequence.request_id, error)
            await self.forget(sequence.request_id)

    def _encode(self, sequence: Sequence) -> list[KvMessage]:
        g, tokens = self._runtime.geometry, sequence.kv_tokens
        table = self._blocks.tables[sequence.request_id]
        kv = [self._pool.read(table, layer, tokens) for layer in range(g.num_layers)]
        keys, values = torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])
        layout = KvLayout(swap_id(sequence.request_id), g.fingerprint, g.num_layers, g.num_kv_heads, g.head_dim,
                          tokens, max(1, self._max_chunk_bytes // g.kv_bytes_per_token), g.num_layers, g.dtype)
        chunks = [encode_chunk(layout, index, keys, values) for index in range(layout.chunk_count)]
        return [layout, *chunks, KvEnd(layout.request_id, layout.chunk_count, sequence.generated[-1])]

    async def swap_in(self, sequence: Sequence) -> None:
        """Put the sequence's KV back into its (freshly allocated) blocks."""
        table = self._blocks.tables[sequence.request_id]
        if self._store is not None:
            assembler = KvAssembler(swap_id(sequence.request_id), self._runtime.geometry, sequence.kv_tokens,
                                    self._max_chunk_bytes, PoolTarget(self._pool, table))
            try:
                await self.load(swap_id(sequence.request_id), assembler)
                return
            except Exception as error:  # noqa: BLE001 - recomputing is the fallback
                log.warning("swap-in of %s failed (%s); recomputing its KV", sequence.request_id, error)
        tokens = sequence.prompt_ids + sequence.generated[:-1]
        await self._thread.run(self._runtime.prefill, tokens,
                               lambda layer, k, v: self._pool.write(table, layer, 0, k, v))

    async def forget(self, request_id: str) -> None:
        """Delete the request's stored transfer and swapped KV (they also expire by TTL)."""
        if self._store is None:
            return
        for prefix in (transfer_prefix(request_id), transfer_prefix(swap_id(request_id))):
            try:
                await self._store.delete_prefix(prefix)
            except Exception as error:  # noqa: BLE001
                log.debug("could not delete %s: %s", prefix, error)


def _expect(message: object, kind: type) -> object:
    if not isinstance(message, kind):
        raise KvProtocolError(f"stored KV message is a {type(message).__name__}, expected {kind.__name__}")
    return message
