"""Gateway gRPC servicer: validates the public request, runs it through the Gateway core and
streams protobuf responses."""

from __future__ import annotations

import secrets
import time
from dataclasses import replace
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from services.common import logprobs
from services.common.edge import grpc_edge
from services.common.errors import BackendUnavailable, InvalidRequest, call_status
from services.common.logs import request_id_var, request_tag
from services.common.pb import common_pb2, decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from services.common.channels import ChannelPool
from services.common.sampling import sampling_from_pb
from services.common.server import Lifecycle
from services.common.telemetry import ServiceTelemetry
from services.common.validation import check_id
from services.gateway.core import Gateway, GenerateInput, GenerateOutput, new_request_id
from services.gateway.auth import cache_salt, presented_key
from services.gateway.routing import Worker
from services.gateway.text import ChatTurn
from services.gateway.tools import ToolCall, tools_from_pb, with_tools

_FINISH_PB = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH,
              "tool_calls": common_pb2.FINISH_REASON_TOOL_CALLS}


def generate_input(request: gateway_pb2.GenerateRequest, default_max_tokens: int,
                   salt: str = "") -> GenerateInput:
    """The domain request from the wire; validates what the wire types cannot. The request gets an
    internal id; the client's request_id (if any) is only its label."""
    check_id("request_id", request.request_id, required=False)
    sampling_pb = common_pb2.SamplingParams()
    sampling_pb.CopyFrom(request.sampling)
    if not sampling_pb.HasField("seed"):
        sampling_pb.seed = secrets.randbits(63)  # fixed per request so any worker samples alike
    sampling = sampling_from_pb(sampling_pb, default_max_tokens)
    kind = request.WhichOneof("input")
    prompt: str | tuple[int, ...] | None = None
    messages = None
    tools = tools_from_pb([(f.name, f.description, f.parameters_json) for f in request.tools.functions],
                          request.tools.choice, not request.tools.single_call)
    if tools is not None and kind != "chat":
        raise InvalidRequest("tools: only a chat conversation can call tools")
    sampling = replace(sampling, constraint=with_tools(sampling.constraint, tools))
    if kind == "chat":
        messages = [ChatTurn(m.role, m.content, m.tool_call_id, tuple(ToolCall(c.id, c.name, c.arguments)
                                                                        for c in m.tool_calls))
                    for m in request.chat.messages]
    elif kind == "prompt_tokens":
        prompt = tuple(request.prompt_tokens.token_ids)
    elif kind == "prompt":
        prompt = request.prompt
    else:
        raise InvalidRequest("prompt must not be empty (give prompt or chat)")
    return GenerateInput(new_request_id(), prompt, messages, sampling, request.max_cache_budget_mb, request.request_id,
                         request.best_of, tools, salt)


def _response(request_id: str, output: GenerateOutput) -> gateway_pb2.GenerateResponse:
    response = gateway_pb2.GenerateResponse(request_id=request_id, token_ids=output.token_ids, text=output.text,
                                            logprobs=[logprobs.to_pb(entry) for entry in output.logprobs],
                                            prompt_logprobs=[logprobs.to_pb(entry)
                                                             for entry in output.prompt_logprobs or ()],
                                            prompt_token_ids=output.prompt_token_ids, choice=output.choice,
                                            tool_calls=[gateway_pb2.ToolCall(id=call.id, name=call.name,
                                                                             arguments=call.arguments)
                                                        for call in output.tool_calls])
    if output.finish_reason is not None:
        response.finish_reason = _FINISH_PB[output.finish_reason]
    if output.usage is not None:
        usage = output.usage
        response.usage.CopyFrom(gateway_pb2.Usage(prompt_tokens=usage.prompt_tokens,
                                                  completion_tokens=usage.completion_tokens,
                                                  total_tokens=usage.prompt_tokens + usage.completion_tokens))
    return response


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Serves once `ready` is set (after the tokenizer loaded); until then calls are UNAVAILABLE.
    API keys are checked before any handler runs (`ApiKeyInterceptor`)."""

    def __init__(self, telemetry: ServiceTelemetry, lifecycle: Lifecycle, channels: ChannelPool,
                 default_max_tokens: int, share_prefix_cache: bool = False) -> None:
        self.telemetry = telemetry
        self.lifecycle = lifecycle
        self._gateway: Gateway | None = None
        self._channels = channels
        self._default_max_tokens = default_max_tokens
        self._share_prefix_cache = share_prefix_cache

    def ready(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def core(self) -> Gateway:
        """The gateway core once ready (also what the HTTP API drives)."""
        if self._gateway is None:
            raise BackendUnavailable("gateway is starting")
        return self._gateway

    @grpc_edge(new_work=True)
    async def Generate(self, request: gateway_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        gateway = self.core()
        span = trace.get_current_span()
        span.set_attribute("request.label", request.request_id)
        salt = cache_salt(presented_key(context.invocation_metadata() or ()), request.cache_salt,
                          self._share_prefix_cache)
        domain = generate_input(request, self._default_max_tokens, salt)
        request_id_var.set(request_tag(domain.request_id, domain.label))
        span.set_attribute("request.id", domain.request_id)
        async for output in gateway.generate(domain):
            yield _response(domain.name, output)

    @grpc_edge(new_work=False)
    async def GetModelInfo(self, request: common_pb2.ModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> common_pb2.ModelInfo:
        """The model, as the serving decode workers report it: the next one when one went away."""
        last = ""
        for worker in self.core().decode_pool.ranked():  # (raises BackendUnavailable with none serving)
            stub = decode_pb2_grpc.DecodeServiceStub(self._channels.get(worker.address))
            try:
                return await stub.GetModelInfo(common_pb2.ModelInfoRequest(), timeout=10)
            except grpc.aio.AioRpcError as error:
                code, last = call_status(error)
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise
        raise BackendUnavailable(f"no serving decode worker answered GetModelInfo; last error: {last}")

    @grpc_edge(new_work=False)
    async def Stats(self, request: common_pb2.StatsRequest,
                    context: grpc.aio.ServicerContext) -> gateway_pb2.GatewayStats:
        gateway = self.core()
        now = time.monotonic()
        workers = [_worker_status(w, now) for pool in (gateway.prefill_pool, gateway.decode_pool) for w in pool.workers]
        return gateway_pb2.GatewayStats(active_requests=gateway.active_requests, workers=workers)


def _worker_status(worker: Worker, now: float) -> gateway_pb2.WorkerStatus:
    return gateway_pb2.WorkerStatus(
        address=worker.address, role=worker.role, active_requests=worker.active,
        state=gateway_pb2.WorkerState.Value(f"WORKER_STATE_{worker.state.name}"),
        consecutive_failures=worker.failures, backoff_seconds=worker.backoff_left(now),
        last_failure=worker.last_failure)
