"""The prefix cache's second tier: full prompt blocks in the kvstore (memory, Redis or shared memory
behind it), so that every prefill worker, and a restarted one, finds what any of them computed.

A block is stored under `prefix/<block key>` (services.common.prefix_keys; the kvstore namespace is
the model fingerprint) as its raw tensor bytes, [layers, 2, kv_heads, block_size, head_dim] in the
model's dtype, C order, little-endian, followed by their CRC-32C (4 bytes, little-endian). A value
of another length or checksum is not used (nothing is ever unpickled). Writes happen in the
background after a forward pass, reads when a prompt's next block is not in memory; both are best
effort: a kvstore that is down costs a recomputation, never a request.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

import google_crc32c
import torch

from services.common.errors import UnknownRequest
from services.common.kv_codec import tensor_bytes
from services.common.kvstore_client import KvStoreClient
from services.common.runtime import DTYPES, ModelGeometry
from services.prefill.prefix_cache import Block

log = logging.getLogger(__name__)
KEY_PREFIX = "prefix/"


class PrefixStore:
    def __init__(self, store: KvStoreClient, geometry: ModelGeometry, block_size: int, ttl_seconds: int) -> None:
        self._store = store
        self._shape = (geometry.num_layers, 2, geometry.num_kv_heads, block_size, geometry.head_dim)
        self._dtype = DTYPES[geometry.dtype]
        self._ttl = ttl_seconds

    async def load(self, keys: Sequence[str]) -> list[Block]:
        """The blocks of `keys` the kvstore holds, in order, up to the first it does not."""
        found: list[Block] = []
        for key in keys:
            try:
                block = self._decode(await self._store.get(KEY_PREFIX + key))
            except UnknownRequest:
                break
            except Exception as error:  # noqa: BLE001 - best effort: the blocks are computed instead
                log.debug("prefix blocks not read from the kvstore: %s", error)
                break
            if block is None:
                log.warning("prefix block %s in the kvstore is damaged (length or checksum); not used", key)
                break
            found.append(block)
        return found

    async def save(self, blocks: Sequence[tuple[str, Block]]) -> None:
        for key, block in blocks:
            data = tensor_bytes(block)
            try:
                await self._store.put(KEY_PREFIX + key, data + struct.pack("<I", google_crc32c.value(data)), self._ttl)
            except Exception as error:  # noqa: BLE001 - best effort: only the shared copy is lost
                log.debug("prefix blocks not written to the kvstore: %s", error)
                return

    def _decode(self, value: bytes) -> Block | None:
        expected = torch.Size(self._shape).numel() * torch.empty((), dtype=self._dtype).element_size()
        if len(value) != expected + 4:
            return None
        data = value[:expected]
        if google_crc32c.value(data) != struct.unpack("<I", value[expected:])[0]:
            return None
        return torch.frombuffer(bytearray(data), dtype=self._dtype).reshape(self._shape)
