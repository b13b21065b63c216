"""A request on the decode worker, and what its Generate stream receives."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from services.common.grammar import GrammarState
from services.common.logprobs import TokenLogprob
from services.common.sampling import Sampling
from services.decode.blocks import Lease
from services.decode.transfers import Transfer


class State(enum.Enum):
    AWAITING_KV = "awaiting_kv"  # admitted; prompt blocks reserved; KV arriving (pushed, or a fill transfer)
    READY = "ready"  # KV complete, waiting to join the running batch
    RUNNING = "running"
    SWAPPING_OUT = "swapping_out"  # preempted; its KV was copied out of the pool and is on its way to the kvstore
    PREEMPTED = "preempted"  # holds no blocks; KV in the kvstore (swapped) or to be recomputed
    SWAPPING_IN = "swapping_in"  # blocks reserved again; KV coming back (swap-in or recompute)
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class Token:
    token_id: int
    index: int
    logprob: TokenLogprob | None = None  # when the request asks for logprobs (none on a re-sent first token)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # a locally prefilled first token's, when asked
    ends_output: bool = False  # the token completed the request's grammar
    choice: int = 0  # which of the request's sampling.n choices it belongs to


@dataclass(frozen=True, slots=True)
class Finished:
    reason: str
    completion_tokens: int
    choice: int = 0


Event = Token | Finished | Exception


@dataclass(eq=False, slots=True)
class Sequence:
    request_id: str  # the gateway's internal id
    prompt_ids: list[int]
    sampling: Sampling
    position_offset: int = 0  # completion tokens produced before this worker took over (failover)
    budget_bytes: int = 0  # KV it may hold while others need the pool (0: no budget)
    label: str = ""  # the client's own id, for logs
    state: State = State.AWAITING_KV
    generated: list[int] = field(default_factory=list)
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    lease: Lease | None = None  # the current writer's right to its blocks
    transfer: Transfer | None = None  # a background KV move in flight (fill, swap-out, swap-in)
    transfer_attempt: int = -1  # highest pushed transfer attempt accepted so far (-1: none yet)
    swapped: bool = False  # while preempted: its KV is in the kvstore (else it is recomputed)
    swaps: int = 0  # times it was swapped out (names its kvstore keys)
    admitted_at: float = field(default_factory=time.monotonic)
    kv_bytes_received: int = 0
    grammar: GrammarState | None = None  # structured output: where the completion stands in its grammar
    choice: int = 0  # which of the request's choices this is (sampling.n > 1)
    siblings: list[Sequence] = field(default_factory=list)  # choice 0's: choices 1 .. n-1, sharing its queue
    family: str = ""  # choices 1 .. n-1: choice 0's request id
    cache_salt: str = ""  # names its prompt's blocks in the prefix cache (with the prompt and the model)
    block_keys: list[str] = field(default_factory=list)  # its full prompt blocks' names (prefix cache on)
    cached_tokens: int = 0  # leading prompt tokens taken from the prefix cache at admission
    cache_generation: int = 0  # of the prefix cache at admission (a flush since: its blocks join no cache)
    prefilled_here: bool = False  # its KV comes from a local prefill (unified and conditional modes)

    @property
    def request(self) -> str:
        """The request it is a choice of (its own id for choice 0)."""
        return self.family or self.request_id

    @property
    def store_id(self) -> str:
        """What its stored (swapped) KV is named by: every choice's keys lie under the request's, so
        one delete clears them all, whoever ends the request."""
        return f"{self.family}/c{self.choice}" if self.family else self.request_id

    @property
    def choices(self) -> list[Sequence]:
        """Every choice of the request (this one is choice 0)."""
        return [self, *self.siblings]

    def sibling(self, choice: int) -> Sequence:
        """Choice `choice` of this request (choice 0's): its own id (its own blocks and swap keys),
        seed and grammar position; the request's event queue."""
        return Sequence(f"{self.request_id}-c{choice}", self.prompt_ids, self.sampling.for_choice(choice),
                        self.position_offset, self.budget_bytes, self.label, events=self.events,
                        grammar=None if self.grammar is None else self.grammar.fork(), choice=choice,
                        family=self.request_id)

    @property
    def scored_here(self) -> bool:
        """Its prompt's log-probabilities are computed on this worker (a whole forward pass)."""
        return self.prefilled_here and self.sampling.prompt_logprobs is not None

    @property
    def kv_tokens(self) -> int:
        """Tokens whose KV is in the pool: the prompt and every generated token but the last."""
        return len(self.prompt_ids) + max(0, len(self.generated) - 1)

    @property
    def peak_kv_tokens(self) -> int:
        """Most tokens of KV the sequence can ever need: the last token sampled is never fed back."""
        return len(self.prompt_ids) + self.sampling.max_tokens - self.position_offset - 1

    def over_budget(self, bytes_per_token: int) -> bool:
        return 0 < self.budget_bytes < self.kv_tokens * bytes_per_token

    @property
    def completion_index(self) -> int:
        """Completion position of the next token to sample."""
        return self.position_offset + len(self.generated)
