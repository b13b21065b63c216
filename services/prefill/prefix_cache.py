"""The prefill worker's prefix cache: the KV of full prompt blocks it computed, named by their chained
keys (services.common.prefix_keys), kept in memory up to a byte budget, least recently used out first.

A prompt whose leading blocks are cached is prefilled from the first block that is not: the cached
KV seeds the forward pass's cache and only the rest is computed (the last prompt token always is,
for its logits); the transfer still carries the whole prompt's KV. The blocks a forward pass computed
are stored after its first token has gone out.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
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


Recorded = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> KV of the rows to store, copied


class KvRecorder:
    """Wraps a forward pass's layer callback: each layer's KV gets the cached prefix in front (what
    the transfer sends), and the rows of the blocks to store are copied aside (copies, so the forward
    pass's cache is not kept alive by them)."""

    def __init__(self, hit: PrefixHit, on_layer: LayerKvCallback, rows: tuple[int, int] | None) -> None:
        self._hit = hit
        self.on_layer = on_layer  # the wrapped callback (called directly when nothing is to be done here)
        self._rows = rows  # token range [start, end) of the blocks to store, if any
        self.layers: Recorded = {}

    def __call__(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self._hit.blocks:
            cached_keys, cached_values = self._hit.layer_kv(layer)
            keys, values = torch.cat([cached_keys, keys], dim=1), torch.cat([cached_values, values], dim=1)
        if self._rows is not None:
            rows = slice(*self._rows)
            self.layers[layer] = (keys[:, rows].clone(), values[:, rows].clone())
        self.on_layer(layer, keys, values)


class PrefixCache:
    def __init__(self, budget_bytes: int, block_size: int, fingerprint: str, block_bytes: int,
                 metrics: PrefixCacheMetrics) -> None:
        self.block_size = block_size
        self._budget = budget_bytes
        self._fingerprint = fingerprint
        self._block_bytes = block_bytes  # KV bytes of one block of the model
        self._metrics = metrics
        self._blocks: OrderedDict[str, Block] = OrderedDict()
        self.bytes = 0
        self.lookup_tokens = self.hit_tokens = 0  # since start (also in the metrics)
        self.store_tier = False  # a kvstore tier looks up what is not held here

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    def lookup(self, prompt: Sequence[int], salt: str, reuse: bool = True, unit: int = 0) -> PrefixHit:
        """The prompt's reusable leading blocks held here, a whole number of `unit` tokens (default:
        blocks); none when `reuse` is off, but the keys to store."""
        return self.settle(self.held(prompt, salt, reuse), unit, reuse)

    def held(self, prompt: Sequence[int], salt: str, reuse: bool = True) -> PrefixHit:
        """The prompt's leading blocks held here, as they are (see `settle`)."""
        keys = block_keys(prompt[: len(prompt) - 1], self.block_size, self._fingerprint, salt)
        found: list[Block] = []
        for key in keys if reuse else ():
            block = self._blocks.get(key)
            if block is None:
                break
            found.append(block)
        return PrefixHit(keys, found, self.block_size)

    def settle(self, hit: PrefixHit, unit: int = 0, reuse: bool = True, from_store: int = 0) -> PrefixHit:
        """The hit cut to a whole number of `unit` tokens, touched and counted (`from_store` of its
        blocks came from the kvstore tier, after those held here)."""
        unit = math.lcm(unit or self.block_size, self.block_size)
        found = hit.blocks[: len(hit.blocks) * self.block_size // unit * unit // self.block_size]
        self._touch(hit.keys[: len(found)])
        looked_up = len(hit.keys) * self.block_size if reuse else 0
        local = len(hit.blocks) - from_store
        self.lookup_tokens += looked_up
        self.hit_tokens += len(found) * self.block_size
        self._metrics.lookup_tokens.labels("memory").inc(looked_up)
        self._metrics.hit_tokens.labels("memory").inc(min(local, len(found)) * self.block_size)
        if from_store or (reuse and local < len(hit.keys) and self.store_tier):
            self._metrics.lookup_tokens.labels("kvstore").inc((len(hit.keys) - local) * self.block_size)
            self._metrics.hit_tokens.labels("kvstore").inc(max(0, len(found) - local) * self.block_size)
        return PrefixHit(hit.keys, found, self.block_size)

    def wanted(self, hit: PrefixHit) -> list[int]:
        """Indices of the prompt's blocks to store after its forward pass: those after the hit that
        are not held, no more than the budget holds."""
        missing = [i for i in range(len(hit.blocks), len(hit.keys)) if hit.keys[i] not in self._blocks]
        return missing[: self._budget // self._block_bytes]

    def rows(self, wanted: list[int]) -> tuple[int, int] | None:
        """The token range a forward pass records for `wanted` blocks."""
        return (wanted[0] * self.block_size, (wanted[-1] + 1) * self.block_size) if wanted else None

    def make_blocks(self, hit: PrefixHit, wanted: list[int], recorded: Recorded) -> list[tuple[str, Block]]:
        """The wanted blocks out of the recorded rows (which start at the first wanted block).
        Pure tensor work: off the event loop."""
        first, made = wanted[0], []
        for index in wanted:
            rows = slice((index - first) * self.block_size, (index - first + 1) * self.block_size)
            made.append((hit.keys[index], torch.stack([torch.stack([keys[:, rows], values[:, rows]])
                                                       for _, (keys, values) in sorted(recorded.items())])))
        return made

    def insert(self, blocks: list[tuple[str, Block]], chain: list[str]) -> None:
        """Store a prompt's new blocks (on the event loop, like lookups). Its chain is then touched
        back to front, so that eviction (least recently used first) takes the ends of chains before
        their beginnings, which every longer prompt needs."""
        for key, block in reversed(blocks):
            if key not in self._blocks:
                self._blocks[key] = block
                self.bytes += block.numel() * block.element_size()
        self._touch(chain)
        while self.bytes > self._budget and self._blocks:
            _, evicted = self._blocks.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
            self._metrics.evictions.inc()
        self._metrics.blocks.set(len(self._blocks))

    def _touch(self, chain: list[str]) -> None:
        for key in reversed(chain):
            if key in self._blocks:
                self._blocks.move_to_end(key)


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
                    "(full blocks), per tier (memory, then kvstore)", ["tier"], registry=registry),
            Counter("disagg_prefix_cache_hit_tokens", "prompt tokens found there (not computed again)", ["tier"],
                    registry=registry),
            Counter("disagg_prefix_cache_evictions", "cached blocks evicted (least recently used first)",
                    registry=registry),
            Gauge("disagg_prefix_cache_blocks", "blocks in the prefill's prefix cache", registry=registry))
