"""The prefill worker's prefix cache: the KV of full prompt blocks it computed, named by their chained
keys (services.common.prefix_keys), kept in memory up to a byte budget, least recently used out first.

A prompt whose leading blocks are cached is prefilled from the first block that is not: the cached
KV seeds the forward pass's cache and only the rest is computed (the last prompt token always is,
for its logits); the transfer still carries the whole prompt's KV. The blocks a forward pass computed
are stored after its first token has gone out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.common.prefix_keys import block_keys
from services.common.runtime import LayerKvCallback

# One block: [layers, 2 (keys, values), kv_heads, block_size, head_dim]
Block = torch.Tensor


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """What a prompt finds in the cache: its full blocks' keys and the leading blocks found."""

    keys: list[str]  # every full block of the prompt that may be reused (the last token is never)
    blocks: list[Block]  # the cached leading blocks
    block_size: int

    @property
    def tokens(self) -> int:
        return len(self.blocks) * self.block_size

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [kv_heads, tokens, head_dim] of one layer of the cached prefix."""
        keys = torch.cat([block[layer, 0] for block in self.blocks], dim=1)
        values = torch.cat([block[layer, 1] for block in self.blocks], dim=1)
        return keys, values

    def seed(self, cache: object, num_layers: int) -> None:
        """Put the cached prefix into a forward pass's (empty) DynamicCache."""
        for layer in range(num_layers):
            keys, values = self.layer_kv(layer)
            cache.update(keys[None], values[None], layer)  # type: ignore[attr-defined]


class KvRecorder:
    """Wraps a forward pass's layer callback: each layer's KV, the cached prefix in front (what the
    transfer sends), and a record of it for storing the new blocks afterwards."""

    def __init__(self, hit: PrefixHit, on_layer: LayerKvCallback) -> None:
        self._hit = hit
        self._on_layer = on_layer
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self._hit.blocks:
            cached_keys, cached_values = self._hit.layer_kv(layer)
            keys, values = torch.cat([cached_keys, keys], dim=1), torch.cat([cached_values, values], dim=1)
        self.layers[layer] = (keys, values)
        self._on_layer(layer, keys, values)


class PrefixCache:
    def __init__(self, budget_bytes: int, block_size: int, fingerprint: str, metrics: PrefixCacheMetrics) -> None:
        self.block_size = block_size
        self._budget = budget_bytes
        self._fingerprint = fingerprint
        self._metrics = metrics
        self._blocks: OrderedDict[str, Block] = OrderedDict()
        self.bytes = 0
        self.lookup_tokens = self.hit_tokens = 0  # since start (also in the metrics)

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    def lookup(self, prompt: Sequence[int], salt: str, reuse: bool = True) -> PrefixHit:
        """The prompt's reusable leading blocks (none when `reuse` is off, but the keys to store)."""
        keys = block_keys(prompt[: len(prompt) - 1], self.block_size, self._fingerprint, salt)
        found: list[Block] = []
        for key in keys if reuse else ():
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            found.append(block)
        looked_up = len(keys) * self.block_size if reuse else 0
        self.lookup_tokens += looked_up
        self.hit_tokens += len(found) * self.block_size
        self._metrics.lookup_tokens.inc(looked_up)
        self._metrics.hit_tokens.inc(len(found) * self.block_size)
        return PrefixHit(keys, found, self.block_size)

    def new_blocks(self, hit: PrefixHit, layers: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                   num_layers: int) -> list[tuple[str, Block]]:
        """The blocks a forward pass computed (after the hit's), copied out of `layers(i)`, layer
        i's whole-prompt KV [kv_heads, tokens, head_dim]. Pure tensor work: off the event loop."""
        made = []
        for index in range(len(hit.blocks), len(hit.keys)):
            if hit.keys[index] in self._blocks:
                continue
            rows = slice(index * self.block_size, (index + 1) * self.block_size)
            made.append((hit.keys[index], torch.stack([torch.stack([layers(i)[0][:, rows], layers(i)[1][:, rows]])
                                                       for i in range(num_layers)])))
        return made

    def insert(self, blocks: list[tuple[str, Block]]) -> None:
        """Store blocks (on the event loop, like lookups), evicting the least recently used."""
        for key, block in blocks:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            self._blocks[key] = block
            self.bytes += block.numel() * block.element_size()
        while self.bytes > self._budget and self._blocks:
            _, evicted = self._blocks.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
            self._metrics.evictions.inc()
        self._metrics.blocks.set(len(self._blocks))


@dataclass(frozen=True, slots=True)
class PrefixCacheMetrics:
    lookup_tokens: Counter
    hit_tokens: Counter
    evictions: Counter
    blocks: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> PrefixCacheMetrics:
        return cls(
            Counter("disagg_prefix_cache_lookup_tokens", "prompt tokens looked up in the prefill's prefix cache "
                    "(full blocks)", ["tier"], registry=registry).labels("memory"),
            Counter("disagg_prefix_cache_hit_tokens", "prompt tokens found there (not computed again)", ["tier"],
                    registry=registry).labels("memory"),
            Counter("disagg_prefix_cache_evictions", "cached blocks evicted (least recently used first)",
                    registry=registry),
            Gauge("disagg_prefix_cache_blocks", "blocks in the prefill's prefix cache", registry=registry))
