"""Who may enter the decode worker, checked before anything is reserved: a request (valid, not a
live id, able to fit the pool at all, and room for it now), and a pushed KV transfer (for a
request still waiting for its KV, newer than any transfer it already has, and starting no later
than the prompt's cached prefix ends)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import AlreadyExists, CapacityExhausted, InvalidRequest, KvProtocolError, UnknownRequest
from services.common.kv_codec import KvLayout
from services.common.kv_assembly import check_token_start
from services.common.logit_controls import check_vocabulary
from services.common.prefix_keys import check_salt
from services.common.runtime import ModelGeometry
from services.common.validation import budget_bytes, check_budget_mb, check_id, check_token_ids
from services.decode.blocks import BlockManager
from services.decode.sequence import Sequence, State


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_active_requests: int
    reject_threshold: float  # pool pressure above which new requests are refused
    default_budget_mb: float = 0.0  # per-request KV budget of a request that names none (0: none)


class Admission:
    def __init__(self, geometry: ModelGeometry, blocks: BlockManager, limits: AdmissionLimits) -> None:
        self._geometry = geometry
        self._blocks = blocks
        self._limits = limits

    def budget_bytes(self, requested_mb: float) -> int:
        """A request's KV budget in bytes (InvalidRequest unless finite and >= 0)."""
        check_budget_mb(requested_mb)  # the default is checked by the settings
        return budget_bytes(requested_mb or self._limits.default_budget_mb)

    def check(self, request: Sequence, live: dict[str, Sequence]) -> None:
        check_id("request_id", request.request_id)
        check_id("client_request_id", request.label, required=False)
        check_salt(request.cache_salt)
        for choice in request.choices:  # (another choice's id is the request's with a suffix)
            if choice.request_id in live or self._blocks.holds_blocks(choice.request_id):
                # (a released request whose step is still running keeps its blocks until the step ends)
                raise AlreadyExists(f"request {choice.request_id!r} is already live on this worker")
        if not request.prompt_ids:
            raise InvalidRequest("prompt_token_ids must not be empty")
        check_token_ids("prompt_token_ids", request.prompt_ids, self._geometry.vocab_size)
        check_vocabulary(request.sampling.logit_bias, request.sampling.stop_token_ids, self._geometry.vocab_size)
        if request.position_offset and request.sampling.n > 1:
            raise InvalidRequest("position_offset must be 0 with sampling.n > 1 (a failover resumes each choice "
                                 "on its own)")
        if request.position_offset >= request.sampling.max_tokens:
            raise InvalidRequest(f"position_offset ({request.position_offset}) must be below max_tokens "
                                 f"({request.sampling.max_tokens}): the completion would already be complete")
        total = len(request.prompt_ids) + request.sampling.max_tokens - request.position_offset
        if total > self._geometry.max_model_len:
            raise InvalidRequest(f"prompt ({len(request.prompt_ids)}) + max_tokens ({request.sampling.max_tokens}) "
                                 f"exceeds the model's context of {self._geometry.max_model_len}")
        peak = max(len(request.prompt_ids), request.peak_kv_tokens)
        if self._blocks.blocks_for(peak) > self._blocks.total:
            raise CapacityExhausted(f"prompt + max_tokens need {peak} tokens of KV, more than this worker's whole "
                                    f"KV pool ({self._blocks.total} blocks of {self._blocks.block_size} tokens) "
                                    "can ever hold")
        if request.sampling.n > self._limits.max_active_requests:
            raise InvalidRequest(f"sampling.n ({request.sampling.n}) is more than this worker's "
                                 f"--max-active-requests ({self._limits.max_active_requests}): each choice is one")
        active = sum(sequence.state is not State.FINISHED for sequence in live.values())  # (ended choices linger)
        if active + request.sampling.n > self._limits.max_active_requests:
            raise CapacityExhausted(f"decode worker is full ({self._limits.max_active_requests} active requests, "
                                    "each choice counting as one)")
        if self._blocks.pressure > self._limits.reject_threshold:
            raise CapacityExhausted(f"KV pool pressure {self._blocks.pressure:.2f} is above the reject threshold")

    def check_room(self, request: Sequence, cached: list[int]) -> None:
        """Room now for the prompt's blocks beyond its cached prefix (`cached`, shared), and a spare
        block for each other choice's copy of a partial last block."""
        prompt = len(request.prompt_ids)
        needed = (self._blocks.blocks_for(prompt) - len(cached)
                  + (request.sampling.n - 1) * (prompt % self._blocks.block_size > 0))
        if needed > (available := self._blocks.available(cached)):
            raise CapacityExhausted(f"KV pool full: the prompt needs {needed} blocks, {available} free")

    @staticmethod
    def transfer_target(layout: KvLayout, live: dict[str, Sequence]) -> Sequence:
        """The request a pushed transfer is for: NOT_FOUND for a request that is not live,
        ALREADY_EXISTS for one whose KV is already complete, INVALID_ARGUMENT for a transfer not
        newer than one it already has."""
        sequence = live.get(layout.request_id)
        if sequence is None or sequence.state is State.FINISHED:
            raise UnknownRequest(f"no request {layout.request_id!r} is waiting for KV on this worker")
        if sequence.choice:
            raise KvProtocolError(f"{layout.request_id!r} is choice {sequence.choice} of a request: its KV comes "
                                  "with the request's")
        if sequence.state is not State.AWAITING_KV:  # a retry after an earlier transfer completed
            raise AlreadyExists(f"request {layout.request_id!r} already holds its complete KV")
        if sequence.transfer is not None:
            raise KvProtocolError(f"request {layout.request_id!r} computes its KV on this worker")
        check_token_start(layout, sequence.cached_tokens)  # (before a bad transfer can supersede a good one)
        if layout.transfer_attempt <= sequence.transfer_attempt:
            raise KvProtocolError(f"request {layout.request_id!r} already has a KV transfer "
                                  f"(attempt {sequence.transfer_attempt}; this one is {layout.transfer_attempt})")
        return sequence
