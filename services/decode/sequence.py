"""A request on the decode worker, and what its Generate stream receives."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

import torch

from services.common.kv_codec import ChunkSpan
from services.common.sampling import Sampling
from services.decode.blocks import BlockPool


class State(enum.Enum):
    AWAITING_KV = "awaiting_kv"  # admitted; prompt blocks reserved; KV arriving
    READY = "ready"  # KV complete, waiting to join the running batch
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks given back; KV swapped to the kvstore or to be recomputed
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class Token:
    token_id: int
    index: int


@dataclass(frozen=True, slots=True)
class Finished:
    reason: str
    completion_tokens: int


Event = Token | Finished | Exception


@dataclass(slots=True)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: Sampling
    position_offset: int = 0  # completion tokens produced before this worker took over (failover)
    budget_bytes: int = 0  # KV it may hold while others need the pool (0: no budget)
    state: State = State.AWAITING_KV
    generated: list[int] = field(default_factory=list)
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    transfer_started: bool = False
    admitted_at: float = field(default_factory=time.monotonic)
    forward_end_unix_nanos: int = 0
    kv_bytes_received: int = 0

    @property
    def kv_tokens(self) -> int:
        """Tokens whose KV is in the pool: the prompt and every generated token but the last."""
        return len(self.prompt_ids) + max(0, len(self.generated) - 1)

    def over_budget(self, bytes_per_token: int) -> bool:
        return 0 < self.budget_bytes < self.kv_tokens * bytes_per_token

    @property
    def completion_index(self) -> int:
        """Completion position of the next token to sample."""
        return self.position_offset + len(self.generated)


class PoolTarget:
    """Puts verified KV chunks straight into a sequence's pool blocks."""

    def __init__(self, pool: BlockPool, blocks: list[int]) -> None:
        self._pool = pool
        self._blocks = blocks

    def store(self, span: ChunkSpan, tensor: torch.Tensor) -> None:
        for offset, layer in enumerate(range(span.layer_start, span.layer_end)):
            self._pool.write(self._blocks, layer, span.token_start, tensor[offset, 0], tensor[offset, 1])
