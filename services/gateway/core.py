"""The gateway's request path.

Life of a request, as a sequence of queues:
  validated and tokenized (chat template for conversations)             span gateway.tokenize
  -> an internal request id is made (the client's id is only a label)
  -> decode worker chosen (fewest requests in flight; the next one if it refuses admission)
     and admitted: its Generate stream answers Accepted; prefill worker chosen (fewest in
     flight)                                                              span gateway.route
  -> the prefill streams the KV straight to the decode worker ('direct'), or stores it in the
     kvstore and announces it on the same stream ('kvstore')
  -> the prefill's first token goes to the client at once; the decode's tokens follow
  -> text deltas (stop strings cut the text and end the request)
  -> finished: the final message carries the finish reason and usage. However the request
     ends, the calls to the workers are cancelled, which frees what they hold.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack, aclosing
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

from services.common.channels import ChannelPool
from services.common.errors import BackendUnavailable, InvalidRequest, KvProtocolError, UpstreamError
from services.common.metrics import GatewayMetrics
from services.common.pb import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2
from services.common.sampling import Sampling, sampling_to_pb
from services.common.validation import check_budget_mb
from services.gateway.prefill_route import PrefillRoute, fault_role
from services.gateway.routing import Worker, WorkerPool
from services.gateway.text import PromptEncoder, TextStream

log = logging.getLogger(__name__)
tracer = trace.get_tracer("disagg.gateway")

FINISH_NAMES = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}
# Admission failures that another decode worker may not have (ALREADY_EXISTS: a worker the
# request failed over from still holds it).
_RETRY_ADMISSION = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS)


@dataclass(frozen=True, slots=True)
class GenerateInput:
    request_id: str  # internal: made here, never chosen by a client (workers and store keys use it)
    prompt: str | None
    messages: list[tuple[str, str]] | None
    sampling: Sampling
    max_cache_budget_mb: float = 0.0
    label: str = ""  # the client's own id, echoed in responses, logs and traces (default: request_id)

    def __post_init__(self) -> None:
        check_budget_mb(self.max_cache_budget_mb)

    @property
    def name(self) -> str:
        return self.label or self.request_id


def new_request_id() -> str:
    """An internal request id: random, so no client can guess or collide with another's."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class GenerateOutput:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class GatewayLimits:
    max_tokens_limit: int
    request_timeout_seconds: float
    kv_transfer: str
    request_summary: bool  # log one line per finished request
    prefill_mode: str = "disaggregated"
    conditional_threshold: int = 256
    max_failovers: int = 2
    max_prefill_retries: int = 2
    prefill_timeout_seconds: float = 60.0

    def prefill_locally(self, prompt_tokens: int) -> bool:
        return self.prefill_mode == "unified" or (
            self.prefill_mode == "conditional" and prompt_tokens < self.conditional_threshold)


@dataclass(slots=True)
class _Attempt:
    """One try at serving a request on one decode worker."""

    number: int = 0  # 0, then 1 per failover
    decode_address: str = ""  # set once a decode worker admitted the request


@dataclass(slots=True)
class _Timeline:
    """When a request's tokens arrived, and what its KV handoff cost."""

    started: float = field(default_factory=time.perf_counter)
    token_times: list[float] = field(default_factory=list)
    handoff_seconds: float = 0.0
    kv_bytes: int = 0

    def token(self) -> None:
        self.token_times.append(time.perf_counter())


class Gateway:
    def __init__(self, encoder: PromptEncoder, prefill: WorkerPool, decode: WorkerPool, channels: ChannelPool,
                 limits: GatewayLimits, metrics: GatewayMetrics) -> None:
        self._encoder = encoder
        self.prefill_pool = prefill
        self.decode_pool = decode
        self._channels = channels
        self._limits = limits
        self._metrics = metrics
        self._prefill_route = PrefillRoute(prefill, channels, limits.prefill_timeout_seconds,
                                           limits.max_prefill_retries, metrics.prefill_retries)
        self.active_requests = 0

    def tokenize(self, request: GenerateInput) -> list[int]:
        if request.messages is not None:
            ids = self._encoder.encode_chat(request.messages)
        elif request.prompt is not None:
            ids = self._encoder.encode_text(request.prompt)
        else:
            raise InvalidRequest("give a prompt or chat messages")
        max_tokens, context = request.sampling.max_tokens, self._encoder.max_model_len
        if max_tokens > self._limits.max_tokens_limit:
            raise InvalidRequest(f"max_tokens must be <= {self._limits.max_tokens_limit}, got {max_tokens}")
        if len(ids) >= context:
            raise InvalidRequest(f"prompt is {len(ids)} tokens; the model's context is {context} tokens")
        if len(ids) + max_tokens > context:
            raise InvalidRequest(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                 f"model's context of {context} tokens")
        return ids

    async def generate(self, request: GenerateInput) -> AsyncIterator[GenerateOutput]:
        timeline = _Timeline()
        with tracer.start_as_current_span("gateway.tokenize") as span:
            prompt_ids = self.tokenize(request)
            span.set_attribute("gateway.prompt_tokens", len(prompt_ids))
        stream = TextStream(self._encoder.tokenizer, request.sampling.stop)
        generated: list[int] = []
        failed: set[str] = set()
        self.active_requests += 1
        try:
            for failover in range(self._limits.max_failovers + 1):
                attempt = _Attempt(failover)
                try:
                    async with aclosing(self._tokens(request, prompt_ids + generated, len(generated), timeline,
                                                     attempt, failed)) as tokens:
                        async for token_id, finish in tokens:
                            if finish is not None:
                                yield self._finish(request, prompt_ids, timeline, [], stream.flush(), finish)
                                return
                            timeline.token()
                            generated.append(token_id)
                            delta, stopped = stream.add(token_id)
                            if stopped:
                                yield self._finish(request, prompt_ids, timeline, [token_id], delta, "stop")
                                return
                            yield GenerateOutput([token_id], delta)
                except grpc.aio.AioRpcError as error:
                    self._report_decode(error, attempt)
                    if not self._may_fail_over(error, attempt, failover):
                        raise
                    failed.add(attempt.decode_address)
                    log.warning("decode worker %s failed (%s) after %d tokens; resuming elsewhere",
                                attempt.decode_address, error.code().name, len(generated))
                    trace.get_current_span().add_event("gateway.failover", {
                        "decode.failed_worker": attempt.decode_address, "tokens.generated": len(generated)})
        finally:
            self.active_requests -= 1

    def _report_decode(self, error: grpc.aio.AioRpcError, attempt: _Attempt) -> None:
        """A decode worker that disappeared (UNAVAILABLE) is skipped with backoff."""
        if error.code() == grpc.StatusCode.UNAVAILABLE and attempt.decode_address:
            self.decode_pool.report_failure(attempt.decode_address, f"Generate UNAVAILABLE: {error.details()}")

    def _may_fail_over(self, error: grpc.aio.AioRpcError, attempt: _Attempt, failover: int) -> bool:
        """A decode worker that disappears mid-stream (UNAVAILABLE) is replaced by another one."""
        return (error.code() == grpc.StatusCode.UNAVAILABLE and attempt.decode_address != ""
                and failover < self._limits.max_failovers)

    def _finish(self, request: GenerateInput, prompt_ids: list[int], timeline: _Timeline, token_ids: list[int],
                text: str, reason: str) -> GenerateOutput:
        usage = Usage(len(prompt_ids), len(timeline.token_times))
        self._observe(request.name, usage, timeline)
        return GenerateOutput(token_ids, text, reason, usage)

    def _observe(self, request_id: str, usage: Usage, timeline: _Timeline) -> None:
        times, metrics = timeline.token_times, self._metrics
        e2e = time.perf_counter() - timeline.started
        ttft = times[0] - timeline.started if times else e2e
        tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
        metrics.ttft.observe(ttft)
        metrics.e2e_latency.observe(e2e)
        if len(times) > 1:
            metrics.time_per_output_token.observe(tpot)
        for earlier, later in zip(times, times[1:]):
            metrics.inter_token_latency.observe(later - earlier)
        metrics.prompt_tokens.inc(usage.prompt_tokens)
        metrics.completion_tokens.inc(usage.completion_tokens)
        if self._limits.request_summary:
            log.info("request %s: prompt %d, completion %d tokens | TTFT %.0f ms | handoff %.1f ms | KV %.2f MB"
                     " | TPOT %.1f ms | %.1f tokens/s | e2e %.2f s", request_id, usage.prompt_tokens,
                     usage.completion_tokens, ttft * 1e3, timeline.handoff_seconds * 1e3, timeline.kv_bytes / 1e6,
                     tpot * 1e3, usage.completion_tokens / e2e if e2e else 0.0, e2e)

    async def _tokens(self, request: GenerateInput, prompt_ids: list[int], offset: int, timeline: _Timeline,
                      attempt: _Attempt, failed: set[str]) -> AsyncIterator[tuple[int, str | None]]:
        """(token, None) for each token, then (0, finish reason). `offset` tokens of the completion
        were generated before (a failover resumes with them appended to the prompt)."""
        sampling = sampling_to_pb(request.sampling)
        # Failovers keep the internal id: the decode that finishes the request then deletes what
        # the failed one left in the kvstore (everything of a request shares one key prefix).
        attempt_id = request.request_id
        prefill_request = prefill_pb2.PrefillRequest(request_id=attempt_id, prompt_token_ids=prompt_ids,
                                                     sampling=sampling, position_offset=offset,
                                                     client_request_id=request.name)
        decode_request = decode_pb2.DecodeRequest(request_id=attempt_id, prompt_token_ids=prompt_ids,
                                                  sampling=sampling, position_offset=offset,
                                                  max_cache_budget_mb=request.max_cache_budget_mb,
                                                  client_request_id=request.name)
        calls: list[grpc.aio.Call] = []
        with ExitStack() as leases:
            try:
                if self._limits.prefill_locally(len(prompt_ids)):
                    decode_request.kv_source = decode_pb2.KV_SOURCE_LOCAL
                    with tracer.start_as_current_span("gateway.route"):
                        decode, decode_call = await self._admit(decode_request, calls, leases, failed)
                else:
                    # The decode worker is admitted first either way, so it owns the request's KV
                    # (and its cleanup) from the start; with 'kvstore' the prefill stores the
                    # chunks and the TransferKv stream only announces them.
                    stored = self._limits.kv_transfer == "kvstore"
                    decode_request.kv_source = decode_pb2.KV_SOURCE_KVSTORE if stored else decode_pb2.KV_SOURCE_DIRECT
                    prefill_request.store_kv = stored
                    with tracer.start_as_current_span("gateway.route"):
                        decode, decode_call = await self._admit(decode_request, calls, leases, failed)
                    prefill_request.decode_address = decode.address
                    attempt.decode_address = decode.address
                    async for token in self._prefill(prefill_request, calls, timeline, decode_call, attempt):
                        yield token, None
                attempt.decode_address = decode.address
                # read() rather than `async for`: admission already read from this call
                while (event := await decode_call.read()) is not grpc.aio.EOF:
                    if event.HasField("finished"):
                        yield 0, FINISH_NAMES[event.finished.reason]
                        return
                    yield event.token.token_id, None
                raise KvProtocolError("decode stream ended without a finish event")
            finally:
                for call in calls:
                    call.cancel()

    async def _prefill(self, request: prefill_pb2.PrefillRequest, calls: list[grpc.aio.Call], timeline: _Timeline,
                       decode_call: grpc.aio.Call, attempt: _Attempt) -> AsyncIterator[int]:
        """The first token as soon as it is sampled; returns once the KV handoff is complete. A
        failing prefill worker is replaced by another one (services/gateway/prefill_route.py). An
        error that is the decode's passes on as it came (the decode failover rules apply); any
        other (a kvstore that is down, a request the prefill refuses) ends the request with its
        status and is never taken for a decode failure."""
        first_attempt = attempt.number * self._prefill_route.attempts
        try:
            async for event in self._prefill_route.events(request, calls, decode_call, first_attempt):
                if event.HasField("first_token"):
                    yield event.first_token.token_id
                else:
                    timeline.handoff_seconds, timeline.kv_bytes = event.done.handoff_seconds, event.done.kv_bytes
        except grpc.aio.AioRpcError as error:
            role = fault_role(error)
            if role == "decode" or decode_call.done():
                raise
            raise UpstreamError(error.code(), error.details() or error.code().name, role or "prefill") from None

    async def _admit(self, request: decode_pb2.DecodeRequest, calls: list[grpc.aio.Call], leases: ExitStack,
                     failed: set[str]) -> tuple[Worker, grpc.aio.UnaryStreamCall]:
        """Admit the request on the least loaded decode worker that takes it (workers that failed
        this request go last)."""
        last_error: Exception = BackendUnavailable("no decode worker admitted the request")
        for worker in sorted(self.decode_pool.ranked(), key=lambda w: w.address in failed):
            stub = decode_pb2_grpc.DecodeServiceStub(self._channels.get(worker.address))
            call = stub.Generate(request, timeout=self._limits.request_timeout_seconds)
            calls.append(call)
            try:
                event = await call.read()
            except grpc.aio.AioRpcError as error:
                if error.code() not in _RETRY_ADMISSION:
                    raise
                log.info("decode worker %s refused admission: %s", worker.address, error.code().name)
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    self.decode_pool.report_failure(worker.address, f"admission UNAVAILABLE: {error.details()}")
                last_error = error
                continue
            if event is grpc.aio.EOF or not event.HasField("accepted"):
                raise KvProtocolError(f"decode worker {worker.address} did not acknowledge admission")
            trace.get_current_span().set_attribute("gateway.decode_worker", worker.address)
            return leases.enter_context(WorkerPool.lease(worker)), call
        raise last_error
