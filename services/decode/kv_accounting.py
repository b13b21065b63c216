"""What the decode worker looks up and counts about a request's incoming KV: the prompt's cached
prefix at admission (prefix hit rate), and, once a transfer is complete, the bytes it carried, the
bytes it did not need to carry, and the `kv.handoff` span (prefill forward end -> KV verified here;
the two ends use different hosts' clocks)."""

from __future__ import annotations

import time

from opentelemetry import trace

from services.common.kv_assembly import KvReceipt
from services.common.metrics import DecodeMetrics
from services.common.prefix_keys import block_keys
from services.common.telemetry import perf_to_unix_nanos
from services.decode.blocks import BlockManager
from services.decode.sequence import Sequence

tracer = trace.get_tracer("disagg.decode")


class KvAccounting:
    def __init__(self, blocks: BlockManager, fingerprint: str, kv_bytes_per_token: int,
                 metrics: DecodeMetrics) -> None:
        self._blocks = blocks
        self._fingerprint = fingerprint
        self._bytes_per_token = kv_bytes_per_token
        self._metrics = metrics
        self.prefix_lookup_tokens = self.prefix_hit_tokens = 0  # since start (also in the metrics)
        self.kv_bytes_received = self.kv_bytes_saved = 0

    def cached_prefix(self, request: Sequence) -> list[int]:
        """The cached blocks of the prompt's longest cached prefix (names the prompt's blocks, for
        the cache once its KV is here); never its last token (the first decode step needs its KV
        computed before), never for a prompt scored here (its scores need the whole forward pass; a
        prefill worker scores the prompts it sends)."""
        blocks = self._blocks
        if blocks.cache is None:
            return []
        request.block_keys = block_keys(request.prompt_ids, blocks.block_size, self._fingerprint, request.cache_salt)
        if request.scored_here:
            return []
        return blocks.lookup(request.block_keys[: (len(request.prompt_ids) - 1) // blocks.block_size])

    def admitted(self, request: Sequence) -> None:
        """The request was admitted with its cached prefix: count the lookup (a refused one is not
        counted, so that a request tried on several workers counts once)."""
        if self._blocks.cache is None or request.scored_here:
            return
        looked_up = (len(request.prompt_ids) - 1) // self._blocks.block_size * self._blocks.block_size
        self._metrics.prefix_lookup_tokens.inc(looked_up)
        self._metrics.prefix_hit_tokens.inc(request.cached_tokens)
        self.prefix_lookup_tokens += looked_up
        self.prefix_hit_tokens += request.cached_tokens

    def received(self, sequence: Sequence, receipt: KvReceipt) -> None:
        """A transfer is complete: its bytes, the bytes of the prefix it skipped, its handoff span."""
        saved = receipt.token_start * self._bytes_per_token
        sequence.kv_bytes_received = receipt.byte_count
        self._metrics.kv_bytes_received.inc(receipt.byte_count)
        self._metrics.kv_bytes_saved.inc(saved)
        self.kv_bytes_received += receipt.byte_count
        self.kv_bytes_saved += saved
        now = perf_to_unix_nanos(time.perf_counter())
        start = min(receipt.forward_end_unix_nanos or now, now)
        latency = (now - start) / 1e9
        tracer.start_span("kv.handoff", start_time=start, attributes={
            "kv.handoff_ms": latency * 1e3, "kv.bytes": receipt.byte_count,
            "kv.decode_cached_tokens": receipt.token_start}).end(end_time=now)
        self._metrics.handoff_seconds.observe(latency)
