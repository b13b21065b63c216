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
One try on one decode worker is services/gateway/attempt.py. When that decode worker disappears
mid-stream (UNAVAILABLE), the request moves to another one (failover: prompt + the tokens so far,
up to --max-failovers), unless it already has every token (it then just finishes). A request with
several choices (sampling.n, best_of) runs them all in its first try; after a failover each
unfinished choice goes on alone (services/gateway/choices.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

import grpc
from opentelemetry import trace

from services.common.channels import ChannelPool
from services.common.errors import InvalidRequest, call_status
from services.common.logit_controls import check_vocabulary
from services.common.metrics import GatewayMetrics
from services.common.pb import decode_pb2, prefill_pb2
from services.common.sampling import Sampling, sampling_to_pb
from services.common.validation import check_budget_mb
from services.gateway.attempt import Attempt, AttemptRequests, AttemptRunner, Delivery, Timeline
from services.gateway.choices import ChoiceProgress, best_of_choices, check_best_of, workers_sampling
from services.gateway.fanout import merged
from services.gateway.outputs import GenerateOutput, Usage, finished_already, token_output
from services.gateway.placement import PrefillPlacement
from services.gateway.prefill_route import PrefillRoute
from services.gateway.prefix_route import DECODE_LOAD_TOKENS, PrefixAffinity
from services.gateway.routing import WorkerPool
from services.gateway.text import ChatTurn, PromptEncoder, TextStream
from services.gateway.tools import ToolCallStream, Tools

log = logging.getLogger(__name__)
tracer = trace.get_tracer("disagg.gateway")

@dataclass(frozen=True, slots=True)
class GenerateInput:
    request_id: str  # internal: made here, never chosen by a client (workers and store keys use it)
    prompt: str | tuple[int, ...] | None  # text, or token ids taken as they are
    messages: Sequence[ChatTurn | tuple[str, str]] | None
    sampling: Sampling
    max_cache_budget_mb: float = 0.0
    label: str = ""  # the client's own id, echoed in responses, logs and traces (default: request_id)
    best_of: int = 0  # generate this many choices, return the sampling.n best (0: just sampling.n)
    tools: Tools | None = None  # functions the model may call (chat only; services/gateway/tools.py)
    cache_salt: str = ""  # names its prompt's prefix-cache blocks (services/gateway/auth.py cache_salt)

    def __post_init__(self) -> None:
        check_budget_mb(self.max_cache_budget_mb)

    @property
    def name(self) -> str:
        return self.label or self.request_id


def new_request_id() -> str:
    """An internal request id: random, so no client can guess or collide with another's."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class GatewayLimits:
    max_tokens_limit: int
    request_timeout_seconds: float
    kv_transfer: str
    request_summary: bool  # log one line per finished request
    prefill_mode: str = "adaptive"
    conditional_threshold: int = 256
    max_failovers: int = 2
    max_prefill_retries: int = 2
    prefill_timeout_seconds: float = 60.0
    prefix_routing: bool = True  # prefill workers chosen by the prompt blocks they hold, then load


class Gateway:
    def __init__(self, encoder: PromptEncoder, prefill: WorkerPool, decode: WorkerPool, channels: ChannelPool,
                 limits: GatewayLimits, metrics: GatewayMetrics) -> None:
        self.encoder = encoder
        self.prefill_pool = prefill
        self.decode_pool = decode
        self._channels = channels
        self._limits = limits
        self._metrics = metrics
        route = PrefillRoute(prefill, channels, limits.prefill_timeout_seconds, limits.max_prefill_retries,
                             metrics.prefill_retries, PrefixAffinity() if limits.prefix_routing else None)
        decode_affinity = PrefixAffinity(load_tokens=DECODE_LOAD_TOKENS) if limits.prefix_routing else None
        placement = PrefillPlacement(limits.prefill_mode, limits.conditional_threshold, prefill, decode,
                                     metrics.prefills)
        self._attempts = AttemptRunner(decode, channels, limits, route, placement, decode_affinity)
        self.active_requests = 0

    def tokenize(self, request: GenerateInput) -> list[int]:
        if request.messages is not None:
            ids = self.encoder.encode_chat(request.messages, None if request.tools is None else request.tools.offered)
        elif isinstance(request.prompt, tuple):
            ids = self.encoder.check_ids(request.prompt)
        elif request.prompt is not None:
            ids = self.encoder.encode_text(request.prompt)
        else:
            raise InvalidRequest("give a prompt or chat messages")
        check_vocabulary(request.sampling.logit_bias, request.sampling.stop_token_ids, len(self.encoder.tokenizer))
        max_tokens, context = request.sampling.max_tokens, self.encoder.max_model_len
        if max_tokens > self._limits.max_tokens_limit:
            raise InvalidRequest(f"max_tokens must be <= {self._limits.max_tokens_limit}, got {max_tokens}")
        if len(ids) >= context:
            raise InvalidRequest(f"prompt is {len(ids)} tokens; the model's context is {context} tokens")
        if len(ids) + max_tokens > context:
            raise InvalidRequest(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                 f"model's context of {context} tokens")
        return ids

    async def generate(self, request: GenerateInput) -> AsyncGenerator[GenerateOutput, None]:
        """The request's outputs, each tagged with its choice; with best_of, the n best choices once
        every one has finished."""
        if request.sampling.constraint is not None:  # a bad schema is 400 here, not on a worker
            await asyncio.to_thread(request.sampling.constraint.check)
        check_best_of(request.best_of, request.sampling)
        with tracer.start_as_current_span("gateway.tokenize") as span:
            prompt_ids = self.tokenize(request)
            span.set_attribute("gateway.prompt_tokens", len(prompt_ids))
        sampling = workers_sampling(request.sampling, request.best_of)
        started = time.perf_counter()
        # alone (after a failover) a choice keeps its id on the workers: choice 0's is the request's
        choices = [ChoiceProgress(index, f"{request.request_id}-c{index}" if index else request.request_id,
                                  sampling.for_choice(index), TextStream(self.encoder.tokenizer, sampling.stop),
                                  Timeline(started), tool_stream=None if request.tools is None
                                  else ToolCallStream(request.tools)) for index in range(sampling.n)]
        self.active_requests += 1
        try:
            outputs = self._choices(request, sampling, prompt_ids, choices)
            if request.best_of:
                outputs = best_of_choices(outputs, request.sampling.n, request.sampling.logprobs is not None)
            async with aclosing(outputs) as stream:
                async for output in stream:
                    yield output
        finally:
            self.active_requests -= 1

    async def _choices(self, request: GenerateInput, sampling: Sampling, prompt_ids: list[int],
                       choices: list[ChoiceProgress]) -> AsyncGenerator[GenerateOutput, None]:
        """Every choice in one try; the ones a failover interrupts resume each on its own."""
        failed: set[str] = set()
        if len(choices) == 1:
            async with aclosing(self._one_choice(request, prompt_ids, choices[0], 0, failed)) as alone:
                async for output in alone:
                    yield output
            return
        async with aclosing(self._together(request, sampling, prompt_ids, choices, failed)) as together:
            async for output in together:
                yield output
        rest = [self._one_choice(request, prompt_ids, choice, 1, failed) for choice in choices if choice.finish is None]
        async with aclosing(merged(rest)) as resumed:
            async for _, output in resumed:
                yield output

    async def _together(self, request: GenerateInput, sampling: Sampling, prompt_ids: list[int],
                        choices: list[ChoiceProgress], failed: set[str]) -> AsyncGenerator[GenerateOutput, None]:
        """The first try, all choices on one decode worker. Returns early (choices unfinished) when
        that worker disappears and the choices may fail over."""
        attempt = Attempt(0)
        try:
            requests = self._requests(request.request_id, request, sampling, prompt_ids, 0)
            async with aclosing(self._attempts.tokens(requests, choices[0].timeline, attempt, failed)) as tokens:
                async for delivery in tokens:
                    choice = choices[delivery.choice]
                    if choice.finish is not None:  # a stop string ended it here; the worker goes on
                        continue
                    if delivery.choice and not choice.generated and sampling.prompt_logprobs is not None:
                        delivery = replace(delivery, prompt_logprobs=choices[0].prompt_logprobs)
                    yield self._take(request, prompt_ids, choice, delivery)
                    if all(choice.finish is not None for choice in choices):
                        return  # (stop strings may end choices the worker still decodes: cancelled now)
        except grpc.aio.AioRpcError as error:
            self._report_decode(error, attempt)
            for choice in choices:
                if choice.finish is None and (ended := self._ended_already(request, prompt_ids, choice)) is not None:
                    yield ended
            if not self._may_fail_over(error, attempt, 0):
                if any(choice.finish is None for choice in choices):
                    raise
                return
            failed.add(attempt.decode_address)
            log.warning("decode worker %s failed (%s); resuming %d choices elsewhere", attempt.decode_address,
                        call_status(error)[0].name, sum(choice.finish is None for choice in choices))

    async def _one_choice(self, request: GenerateInput, prompt_ids: list[int], choice: ChoiceProgress,
                          first_try: int, failed: set[str]) -> AsyncGenerator[GenerateOutput, None]:
        """One choice alone, moving to another decode worker when its worker disappears."""
        for failover in range(first_try, self._limits.max_failovers + 1):
            attempt = Attempt(failover)
            try:
                requests = self._requests(choice.worker_id, request, choice.sampling, prompt_ids + choice.generated,
                                          len(choice.generated))
                async with aclosing(self._attempts.tokens(requests, choice.timeline, attempt, failed)) as tokens:
                    async for delivery in tokens:
                        output = self._take(request, prompt_ids, choice, delivery)
                        yield output
                        if output.finish_reason is not None:
                            return
            except grpc.aio.AioRpcError as error:
                self._report_decode(error, attempt)
                if (ended := self._ended_already(request, prompt_ids, choice)) is not None:
                    yield ended
                    return
                if not self._may_fail_over(error, attempt, failover):
                    raise
                failed.add(attempt.decode_address)
                log.warning("decode worker %s failed (%s) after %d tokens; resuming elsewhere",
                            attempt.decode_address, call_status(error)[0].name, len(choice.generated))
                trace.get_current_span().add_event("gateway.failover", {
                    "decode.failed_worker": attempt.decode_address, "tokens.generated": len(choice.generated)})

    def _take(self, request: GenerateInput, prompt_ids: list[int], choice: ChoiceProgress,
              delivery: Delivery) -> GenerateOutput:
        """What the client gets of a choice's next token or end (stop token ids and stop strings
        end it here)."""
        if delivery.finish is not None:
            return self._finish(request, prompt_ids, choice, GenerateOutput([], choice.stream.flush()), delivery.finish)
        choice.timeline.token()
        output = replace(token_output(request.sampling, prompt_ids, delivery, first=not choice.generated),
                         choice=choice.index)
        if output.prompt_logprobs is not None:
            choice.prompt_logprobs = output.prompt_logprobs  # the other choices' first outputs repeat them
        choice.generated.append(delivery.token_id)
        choice.ended = delivery.ends_output
        if delivery.token_id in request.sampling.stop_token_ids:  # its text is not output
            return self._finish(request, prompt_ids, choice, replace(output, text=choice.stream.flush()), "stop")
        delta, stopped = choice.stream.add(delivery.token_id)
        if stopped:
            return self._finish(request, prompt_ids, choice, replace(output, text=delta), "stop")
        return replace(output, text=delta if choice.tool_stream is None else choice.tool_stream.add(delta))

    def _ended_already(self, request: GenerateInput, prompt_ids: list[int],
                       choice: ChoiceProgress) -> GenerateOutput | None:
        """The end of a choice whose stream broke after its last token (nothing is missing: a
        failover would sample one token too many, or go on past the end of sequence), else None."""
        reason = finished_already(choice.sampling, choice.generated, choice.ended, self.encoder.eos_token_ids)
        if reason is None:
            return None
        return self._finish(request, prompt_ids, choice, GenerateOutput([], choice.stream.flush()), reason)

    def _requests(self, worker_id: str, request: GenerateInput, sampling: Sampling, prompt_ids: list[int],
                  offset: int) -> AttemptRequests:
        """What one try asks the workers. `offset` completion tokens were generated before (a
        failover resumes with them appended to the prompt). Failovers keep the workers' id: the
        decode that finishes the request deletes what a failed one left in the kvstore (everything
        of a request shares one key prefix)."""
        sampling_pb = sampling_to_pb(sampling)
        if offset:  # the prompt's log-probabilities came with the first token, before the failover
            sampling_pb.ClearField("prompt_logprobs")
        common: dict[str, Any] = {"request_id": worker_id, "prompt_token_ids": prompt_ids, "sampling": sampling_pb,
                  "position_offset": offset, "client_request_id": request.name}
        return AttemptRequests(prefill_pb2.PrefillRequest(**common, cache_salt=request.cache_salt),
                               decode_pb2.DecodeRequest(**common, max_cache_budget_mb=request.max_cache_budget_mb,
                                                        cache_salt=request.cache_salt),
                               offset)

    def _report_decode(self, error: grpc.aio.AioRpcError, attempt: Attempt) -> None:
        """A decode worker that disappeared (UNAVAILABLE) is skipped with backoff."""
        code, details = call_status(error)
        if code == grpc.StatusCode.UNAVAILABLE and attempt.decode_address:
            self.decode_pool.report_failure(attempt.decode_address, f"Generate UNAVAILABLE: {details}")

    def _may_fail_over(self, error: grpc.aio.AioRpcError, attempt: Attempt, failover: int) -> bool:
        """A decode worker that disappears mid-stream (UNAVAILABLE) is replaced by another one."""
        return (call_status(error)[0] == grpc.StatusCode.UNAVAILABLE and attempt.decode_address != ""
                and failover < self._limits.max_failovers)

    def _finish(self, request: GenerateInput, prompt_ids: list[int], choice: ChoiceProgress, output: GenerateOutput,
                reason: str) -> GenerateOutput:
        if choice.tool_stream is not None:  # the calls go out whole, with the end
            text = choice.tool_stream.add(output.text)
            rest, calls = choice.tool_stream.finish()
            output = replace(output, text=text + rest, tool_calls=calls)
            reason = choice.tool_stream.tools.finish_reason(reason, calls)
        choice.finish = reason
        usage = Usage(len(prompt_ids), len(choice.timeline.token_times))
        name = f"{request.name}[{choice.index}]" if request.sampling.n > 1 or request.best_of else request.name
        self._observe(name, usage, choice.timeline, count_prompt=choice.index == 0)
        return replace(output, finish_reason=reason, usage=usage, choice=choice.index)

    def _observe(self, request_id: str, usage: Usage, timeline: Timeline, count_prompt: bool) -> None:
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
        metrics.prompt_tokens.inc(usage.prompt_tokens if count_prompt else 0)
        metrics.completion_tokens.inc(usage.completion_tokens)
        if self._limits.request_summary:
            log.info("request %s: prompt %d (cached %d on the prefill, %d on the decode), completion %d tokens | "
                     "TTFT %.0f ms | handoff %.1f ms | KV %.2f MB | TPOT %.1f ms | %.1f tokens/s | e2e %.2f s",
                     request_id, usage.prompt_tokens, timeline.cached_tokens, timeline.decode_cached_tokens,
                     usage.completion_tokens, ttft * 1e3, timeline.handoff_seconds * 1e3,
                     timeline.kv_bytes / 1e6, tpot * 1e3, usage.completion_tokens / e2e if e2e else 0.0, e2e)
