"""One try at serving a request on one decode worker (the gateway's failover starts a new one).

  admit on the least loaded serving decode worker that takes it (its Generate stream answers
  Accepted; workers that failed this request go last)                     span gateway.route
  -> the prefill (services/gateway/prefill_route.py: another prefill worker when one fails) sends
     the first token at once and hands the KV to that decode worker (inline, or announced after
     storing it in the kvstore); the decode prefills instead where --prefill-mode places the
     prompt there (services/gateway/placement.py)
  -> the decode's tokens, by choice and completion index: indices already passed on are skipped
     (the decode sends the first token too, for when the prefill that sampled it died before
     passing it on)
  -> each choice's finish reason (sampling.n choices share the try). However the try ends, its
     calls to the workers are cancelled, which frees what they hold.
Errors: one that is the decode worker's (its own call failed, or the prefill says the decode caused
it) comes out as that call's gRPC status, for the failover rules; any other (a kvstore that is
down, a request the prefill refuses) as an UpstreamError, so it never counts as a decode failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from opentelemetry import trace

from services.common.channels import ChannelPool
from services.common import logprobs
from services.common.errors import BackendUnavailable, KvProtocolError, UpstreamError, call_status
from services.common.logprobs import TokenLogprob
from services.common.pb import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2
from services.gateway.placement import WHERE, PrefillPlacement
from services.gateway.prefill_route import PrefillRoute, fault_role
from services.gateway.prefix_route import PrefixAffinity
from services.gateway.routing import Worker, WorkerPool

log = logging.getLogger(__name__)
tracer = trace.get_tracer("disagg.gateway")

FINISH_NAMES = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}
# Admission failures that another decode worker may not have (ALREADY_EXISTS: a worker the
# request failed over from still holds it).
_RETRY_ADMISSION = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS)


class RouteLimits(Protocol):
    @property
    def request_timeout_seconds(self) -> float: ...
    @property
    def kv_transfer(self) -> str: ...


@dataclass(slots=True)
class Attempt:
    """One try at serving a request on one decode worker."""

    number: int = 0  # 0, then 1 per failover
    decode_address: str = ""  # set once a decode worker admitted the request


@dataclass(slots=True)
class Timeline:
    """When a request's tokens arrived, and what its KV handoff cost."""

    started: float = field(default_factory=time.perf_counter)
    token_times: list[float] = field(default_factory=list)
    handoff_seconds: float = 0.0
    kv_bytes: int = 0
    cached_tokens: int = 0  # prompt tokens the prefill took from its prefix cache
    decode_cached_tokens: int = 0  # prompt tokens the decode held already (not transferred)

    def token(self) -> None:
        self.token_times.append(time.perf_counter())


@dataclass(frozen=True, slots=True)
class Delivery:
    """A try's next new token, or (finish set) its end."""

    token_id: int = 0
    finish: str | None = None
    logprob: TokenLogprob | None = None  # when the request asks for logprobs and the worker had it
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # with the first token, when the request asks
    ends_output: bool = False  # the token completed the output's grammar: nothing may follow
    choice: int = 0  # which of the request's choices (sampling.n) it belongs to

    @classmethod
    def of(cls, token: prefill_pb2.FirstToken | decode_pb2.DecodeToken) -> Delivery:
        return cls(token.token_id, None, logprobs.from_pb(token.logprob) if token.HasField("logprob") else None,
                   tuple(logprobs.from_pb(entry) for entry in token.prompt_logprobs), token.ends_output, token.choice)


@dataclass(frozen=True, slots=True)
class AttemptRequests:
    """What the workers are asked: the same prompt, sampling and position for both."""

    prefill: prefill_pb2.PrefillRequest
    decode: decode_pb2.DecodeRequest
    offset: int  # completion tokens the client already has


class AttemptRunner:
    def __init__(self, decode_pool: WorkerPool, channels: ChannelPool, limits: RouteLimits,
                 prefill_route: PrefillRoute, placement: PrefillPlacement,
                 affinity: PrefixAffinity | None = None) -> None:
        self._decode_pool = decode_pool
        self._channels = channels
        self._limits = limits
        self._prefill_route = prefill_route
        self._placement = placement
        self._affinity = affinity  # decode workers chosen by the prompt blocks they hold too (None: load only)

    async def tokens(self, requests: AttemptRequests, timeline: Timeline, attempt: Attempt,
                     failed: set[str]) -> AsyncGenerator[Delivery, None]:
        """Each choice's new tokens, then its finish (until every choice has finished)."""
        calls: list[grpc.aio.Call] = []
        choices = requests.decode.sampling.n or 1
        delivered = [requests.offset] * choices  # per choice: the next completion index not passed on
        with ExitStack() as leases:
            try:
                place = leases.enter_context(self._placement.placed(len(requests.decode.prompt_token_ids)))
                local = place.local
                if local:
                    requests.decode.kv_source = decode_pb2.KV_SOURCE_LOCAL
                else:
                    stored = self._limits.kv_transfer == "kvstore"
                    requests.decode.kv_source = decode_pb2.KV_SOURCE_KVSTORE if stored else decode_pb2.KV_SOURCE_DIRECT
                    requests.prefill.store_kv = stored
                # the prompt's block names, for choosing both workers by the blocks they hold
                keys = [] if self._affinity is None else self._affinity.keys(requests.decode.prompt_token_ids,
                                                                             requests.decode.cache_salt)
                with tracer.start_as_current_span("gateway.route") as span:
                    span.set_attribute("gateway.prefill_where", WHERE[local])
                    # Admitted first either way: the decode worker owns the request's KV (and its
                    # cleanup) from the start.
                    decode, decode_call, accepted = await self._admit(requests.decode, calls, leases, failed, keys)
                self._placement.admitted(place)
                attempt.decode_address = decode.address
                # (a decode can never hold the last token: what it claims past that is not passed on)
                held = min(accepted.cached_tokens, len(requests.decode.prompt_token_ids) - 1)
                timeline.decode_cached_tokens = held
                if not local:
                    requests.prefill.decode_address = decode.address
                    requests.prefill.decode_kv_shm_host = accepted.kv_shm_host  # for --kv-transport auto
                    requests.prefill.decode_cached_tokens = held
                    async for delivery in self._prefill(requests.prefill, calls, timeline, decode_call, attempt, keys):
                        if delivery.choice >= choices:
                            raise KvProtocolError(f"the prefill sent a first token of choice {delivery.choice}")
                        delivered[delivery.choice] += 1
                        place.prefilled()  # its first token came: its queue is one shorter
                        yield delivery
                async for delivery in self._decoded(decode_call, delivered):
                    place.prefilled()
                    yield delivery
            finally:
                for call in calls:
                    call.cancel()

    @staticmethod
    async def _decoded(call: grpc.aio.UnaryStreamCall, delivered: list[int]) -> AsyncIterator[Delivery]:
        """Each choice's tokens from completion index `delivered[choice]` on, then its finish."""
        unfinished = set(range(len(delivered)))
        # read() rather than `async for`: admission already read from this call
        while unfinished and (event := await call.read()) is not grpc.aio.EOF:
            kind = event.WhichOneof("kind")
            choice = event.finished.choice if kind == "finished" else event.token.choice
            if kind not in ("finished", "token") or choice not in unfinished:
                raise KvProtocolError(f"the decode sent {kind} for choice {choice}, which is not in progress")
            if kind == "finished":
                unfinished.discard(choice)
                yield Delivery(finish=FINISH_NAMES[event.finished.reason], choice=choice)
            elif event.token.index >= delivered[choice]:
                delivered[choice] = event.token.index + 1
                yield Delivery.of(event.token)
        if unfinished:
            raise KvProtocolError("decode stream ended without a finish event")

    async def _prefill(self, request: prefill_pb2.PrefillRequest, calls: list[grpc.aio.Call], timeline: Timeline,
                       decode_call: grpc.aio.UnaryStreamCall, attempt: Attempt,
                       keys: list[str]) -> AsyncIterator[Delivery]:
        """The first token as soon as it is sampled; returns once the KV handoff is complete (see
        the module docstring for how errors come out)."""
        first_attempt = attempt.number * self._prefill_route.attempts
        try:
            async for event in self._prefill_route.events(request, calls, decode_call, first_attempt, keys):
                if event.HasField("first_token"):
                    yield Delivery.of(event.first_token)
                else:
                    timeline.handoff_seconds, timeline.kv_bytes = event.done.handoff_seconds, event.done.kv_bytes
                    timeline.cached_tokens = event.done.cached_tokens
        except grpc.aio.AioRpcError as error:
            role = fault_role(error)
            if role == "decode" and error.code() == grpc.StatusCode.ALREADY_EXISTS:
                return  # a retry after an earlier try had already handed the whole KV over
            if decode_call.done() and (decoded := await _failure_of(decode_call)) is not None:
                raise decoded from None  # the decode's own status decides (a KV timeout, a death)
            if role == "decode":
                raise
            raise UpstreamError(*call_status(error), role or "prefill") from None

    async def _admit(self, request: decode_pb2.DecodeRequest, calls: list[grpc.aio.Call], leases: ExitStack,
                     failed: set[str], keys: list[str]) -> tuple[Worker, grpc.aio.UnaryStreamCall, decode_pb2.Accepted]:
        """Admit the request on the decode worker that takes it with the least load and, with cache-aware
        routing, the fewest prompt blocks still to move (services/gateway/prefix_route.py); workers
        that failed this request go last."""
        last_error: Exception = BackendUnavailable("no decode worker admitted the request")
        ranked = self._decode_pool.ranked()
        if self._affinity is not None:
            ranked = self._affinity.order(ranked, keys)
        for worker in sorted(ranked, key=lambda w: w.address in failed):
            stub = decode_pb2_grpc.DecodeServiceStub(self._channels.get(worker.address))
            call = stub.Generate(request, timeout=self._limits.request_timeout_seconds)
            calls.append(call)
            try:
                event = await call.read()
            except grpc.aio.AioRpcError as error:
                code, details = call_status(error)
                if code not in _RETRY_ADMISSION:
                    raise
                log.info("decode worker %s refused admission: %s", worker.address, code.name)
                if code == grpc.StatusCode.UNAVAILABLE:
                    self._decode_pool.report_failure(worker.address, f"admission UNAVAILABLE: {details}")
                last_error = error
                continue
            if event is grpc.aio.EOF or not event.HasField("accepted"):
                raise KvProtocolError(f"decode worker {worker.address} did not acknowledge admission")
            trace.get_current_span().set_attribute("gateway.decode_worker", worker.address)
            if self._affinity is not None:
                self._affinity.record(worker.address, keys)  # it keeps them once their KV arrived
            return leases.enter_context(WorkerPool.lease(worker)), call, event.accepted
        raise last_error


async def _failure_of(call: grpc.aio.UnaryStreamCall) -> grpc.aio.AioRpcError | None:
    """A finished call's error status as an AioRpcError, or None if it ended OK."""
    code = await call.code()
    if code == grpc.StatusCode.OK:
        return None
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), await call.trailing_metadata() or grpc.aio.Metadata(),
                                await call.details())
