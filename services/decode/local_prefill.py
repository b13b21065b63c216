"""Unified and conditional modes: the decode worker computes a prompt's KV itself, straight into the
sequence's blocks (under its lease), and samples each choice's first token. A prefix the prefix
cache holds is not computed again: its KV, read from the pool, seeds the forward pass over the rest
(as the prefill worker's own cache does; the last bits may differ from a whole prefill's)."""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import DynamicCache

from services.common.logprobs import TokenLogprob
from services.common.model_thread import ModelThread
from services.common.runtime import ModelRuntime
from services.decode.blocks import BlockManager, LeasedWriter
from services.decode.choosing import TokenChooser
from services.decode.pool import BlockPool
from services.decode.sequence import Sequence, Token


class LocalPrefill:
    def __init__(self, runtime: ModelRuntime, thread: ModelThread, pool: BlockPool, blocks: BlockManager,
                 chooser: TokenChooser) -> None:
        self._runtime = runtime
        self._thread = thread
        self._pool = pool
        self._blocks = blocks
        self._chooser = chooser

    async def first_tokens(self, sequence: Sequence, writer: LeasedWriter) -> list[Token]:
        """Each choice's first token (the prompt's scores go with choice 0's), the KV written."""
        logits, scored = await self._thread.run(self._forward, sequence, writer)
        firsts = []
        for choice in sequence.choices:
            token = self._chooser.choose(logits, choice)
            if isinstance(token, Exception):
                raise token
            firsts.append(replace(token, prompt_logprobs=tuple(scored) if choice is sequence else ()))
        return firsts

    def _forward(self, sequence: Sequence, writer: LeasedWriter) -> tuple[torch.Tensor, list[TokenLogprob]]:
        """On the model thread: the prompt after its cached prefix, on the prefix's KV (all of it when
        its scores are asked for: they need every position; the writer skips the cached blocks)."""
        held = sequence.cached_tokens if sequence.sampling.prompt_logprobs is None else 0
        prompt = sequence.prompt_ids

        def on_layer(layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
            writer.write(layer, held, keys, values)

        # (blocks shared from the cache are never written again; a released request's prefill is cancelled)
        table = self._blocks.table(sequence.request_id) if held else []
        cache = seeded_cache(self._runtime, self._pool, table, held)
        return self._runtime.prefill_scored(prompt[held:], on_layer, prompt[held + 1 :],
                                            sequence.sampling.prompt_logprobs, cache)


def seeded_cache(runtime: ModelRuntime, pool: BlockPool, table: list[int], tokens: int) -> DynamicCache:
    """A forward pass's cache holding the first `tokens` tokens' KV of these pool blocks (copied)."""
    cache = runtime.new_cache()
    for layer in range(runtime.geometry.num_layers if tokens else 0):
        keys, values = pool.read(table, layer, tokens)
        cache.update(keys[None], values[None], layer)
    return cache
