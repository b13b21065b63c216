"""The OpenAI-compatible HTTP API of the gateway (FastAPI, served by uvicorn in the gateway's own
event loop). It drives the same Gateway core as the gRPC API.

  POST /v1/completions, POST /v1/chat/completions  (streaming as server-sent events, or not)
  POST /tokenize, POST /detokenize  (vLLM's utility endpoints)
  GET  /v1/models (with max_model_len), GET /health

Structured output (`response_format` json_object / json_schema, vLLM's guided_json, guided_regex,
guided_choice) becomes one grammar constraint (openai_structured).
A request field this server does not implement is refused with 400 naming it, unless it is
harmless metadata or holds its neutral value (openai_fields). Log-probabilities (completions
`logprobs` and `echo`, chat `logprobs` and `top_logprobs`) come in OpenAI's shapes (openai_logprobs).

Errors use OpenAI's shape and HTTP statuses: 400 bad JSON or field, 401 API key, 404 unknown
model, 429/503 no capacity. A client that disconnects cancels its request everywhere, mid-stream or
while it waits for a whole response (disconnect.py).
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing, suppress
from dataclasses import dataclass, replace
from typing import Any, cast

from fastapi import FastAPI, Request
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.errors import BackendUnavailable, InvalidRequest, ServiceError, status_of
from services.common.grammar import Constraint
from services.common.logprobs import check_top_n
from services.common.sampling import Sampling
from services.common.server import Lifecycle
from services.gateway.auth import ApiKeys, bearer, cache_salt
from services.gateway.core import Gateway, GenerateInput, Usage
from services.gateway.disconnect import CLIENT_CLOSED_REQUEST, ClientDisconnected, unless_disconnected
from services.gateway.fanout import merged
from services.gateway.http_tokens import TokenRoutes, add_token_routes
from services.gateway.openai_fields import unsupported_field
from services.gateway.openai_formats import ChatFormat, CompletionFormat, Indexed, ResponseFormat
from services.gateway.openai_logprobs import TokenNames
from services.gateway.openai_structured import constraint_of
from services.gateway.text import ChatTurn, PromptEncoder
from services.gateway.tools import Tools, tools_from_openai, with_tools
from services.gateway.openai_schema import (HTTP_STATUS, ChatCompletionRequest, CompletionRequest, _Common,
                                            error_body)


_FIELD = re.compile(r"^([a-z_]+)")
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\])$")  # pydantic's tag of a union member
tracer = trace.get_tracer("disagg.gateway")


@dataclass(frozen=True, slots=True)
class HttpApiConfig:
    model_id: str
    default_max_tokens: int
    share_prefix_cache: bool = False  # prefix-cache blocks shared across API keys


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.body = error_body(status, message, param, code)
        self.status = status


def _api_error(error: Exception) -> ApiError:
    if isinstance(error, ApiError):
        return error
    code, details = status_of(error)
    status = HTTP_STATUS.get(code, 500)
    param = field.group(1) if status == 400 and (field := _FIELD.match(details)) else None
    return ApiError(status, details, "messages" if param == "chat" else param, code.name.lower())


def create_app(gateway: Callable[[], Gateway], lifecycle: Lifecycle, keys: ApiKeys, config: HttpApiConfig,
               workers_ready: Callable[[], bool] = lambda: True) -> FastAPI:
    app = FastAPI(title="disagg-serve", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        parts = [str(part) for part in first.get("loc", ()) if part != "body"]
        location = [part for part in parts if not _UNION_BRANCH.match(part)]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(400, "request body is not valid JSON"), status_code=400)
        param = ".".join(location) or None
        # A union field's error names one branch's complaint ("should be a valid string"): say what is wrong.
        message = first.get("msg", "invalid") if parts == location else "has a type this field does not accept"
        return JSONResponse(error_body(400, f"{param or 'body'}: {message}", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(error.status_code, str(error.detail)), status_code=error.status_code)

    def authorize(request: Request) -> None:
        try:
            keys.check(bearer(request.headers.get("authorization")))
        except ServiceError as error:
            raise ApiError(401, str(error), code="invalid_api_key") from None

    def salt(request: Request, body: _Common) -> str:
        """The request's prefix-cache salt: its API key's and its own `cache_salt`'s."""
        try:
            return cache_salt(bearer(request.headers.get("authorization")),
                              "" if body.cache_salt is None else body.cache_salt, config.share_prefix_cache)
        except InvalidRequest as error:
            raise _api_error(error) from None

    def check_model_id(model: str) -> None:
        if model != config.model_id:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {config.model_id!r}",
                           "model", "model_not_found")

    def check_model(body: _Common) -> None:
        check_model_id(body.model)
        refused = unsupported_field(body.model_extra)
        if refused is not None:
            raise ApiError(400, refused[1], refused[0], "unsupported_parameter")

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = not lifecycle.draining and _ready(gateway) and workers_ready()
        return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_id, "object": "model", "created": 0, "owned_by": "disagg-serve",
             "max_model_len": encoder().max_model_len}]})

    def encoder() -> PromptEncoder:
        try:
            return gateway().encoder
        except ServiceError as error:
            raise _api_error(error) from None

    add_token_routes(app, TokenRoutes(encoder, authorize, check_model_id))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        authorize(request)
        check_model(body)
        best_of = body.best_of or body.n
        _unsupported(best_of < body.n, "best_of", f"best_of ({best_of}) must be at least n ({body.n})")
        _unsupported(best_of > body.n and body.stream, "best_of", "best_of > n cannot be streamed")
        try:
            prompts = body.prompts()
        except InvalidRequest as error:
            raise _api_error(error) from None
        scores = Scores(body.logprobs, body.logprobs if body.echo else None)
        constraint = await _constraint(body)
        jobs = [replace(_job("cmpl", prompt, None, body, body.max_tokens, config, scores, constraint,
                             best_of if best_of > body.n else 0), cache_salt=salt(request, body)) for prompt in prompts]
        names = TokenNames(encoder().tokenizer) if body.logprobs is not None else None
        echo = [_prompt_text(prompt, encoder()) for prompt in prompts for _ in range(body.n)] if body.echo else None
        form = CompletionFormat(jobs[0].request_id, config.model_id, names, echo)
        return await _respond(gateway, lifecycle, jobs, body, form, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        authorize(request)
        check_model_id(body.model)
        _refuse_tools(body, encoder())
        check_model(body)
        _unsupported(body.top_logprobs is not None and not body.logprobs, "top_logprobs",
                     "top_logprobs needs logprobs: true")
        try:
            check_top_n("top_logprobs", body.top_logprobs)
        except InvalidRequest as error:
            raise _api_error(error) from None
        messages = [message.turn() for message in body.messages]
        scores = Scores((body.top_logprobs or 0) if body.logprobs else None)
        tools, constraint = await _tools_and_constraint(body)
        job = replace(_job("chatcmpl", None, messages, body, body.max_completion_tokens or body.max_tokens, config,
                           scores, constraint), tools=tools, cache_salt=salt(request, body))
        names = TokenNames(encoder().tokenizer) if body.logprobs else None
        return await _respond(gateway, lifecycle, [job], body, ChatFormat(job.request_id, config.model_id, names),
                              request)

    return app


def _refuse_tools(body: ChatCompletionRequest, encoder: PromptEncoder) -> None:
    """Tools need a chat template that renders them: without one, say so (not just "unsupported")."""
    fields = {**(body.model_extra or {}), "tools": body.tools, "tool_choice": body.tool_choice}
    asked = [name for name in ("tools", "functions") if fields.get(name)]
    asked += [name for name in ("tool_choice", "function_call") if fields.get(name) not in (None, "none", "auto")]
    if asked and not encoder.supports_tools:
        raise ApiError(400, f"{asked[0]}: this model's chat template has no tool support, so it cannot call tools",
                       asked[0], "unsupported_parameter")


def _ready(gateway: Callable[[], Gateway]) -> bool:
    try:
        gateway()
        return True
    except BackendUnavailable:
        return False


def _unsupported(condition: bool, param: str, message: str) -> None:
    if condition:
        raise ApiError(400, message, param)


@dataclass(frozen=True, slots=True)
class Scores:
    """The log-probabilities a request asks for (alternatives per token; None: none)."""

    completion: int | None = None
    prompt: int | None = None


def _prompt_text(prompt: str | tuple[int, ...], encoder: PromptEncoder) -> str:
    """What echo returns: the prompt as given, or its token ids decoded."""
    # decode of one sequence of ids is one string
    return prompt if isinstance(prompt, str) else cast(str, encoder.tokenizer.decode(list(prompt)))


async def _constraint(body: _Common) -> Constraint | None:
    try:
        return await constraint_of(body.structured_fields())
    except InvalidRequest as error:
        raise _api_error(error) from None


async def _tools_and_constraint(body: ChatCompletionRequest) -> tuple[Tools | None, Constraint | None]:
    """The request's tools, and the one grammar on its output: a structured-output field's, or a
    required or named tool choice's (not both)."""
    constraint = await _constraint(body)
    try:
        tools = tools_from_openai(body.tools, body.tool_choice, body.parallel_tool_calls)
        return tools, with_tools(constraint, tools)
    except InvalidRequest as error:
        raise _api_error(error) from None


def _job(prefix: str, prompt: str | tuple[int, ...] | None, messages: Sequence[ChatTurn | tuple[str, str]] | None,
         body: _Common,
         max_tokens: int | None, config: HttpApiConfig, scores: Scores, constraint: Constraint | None,
         best_of: int = 0) -> GenerateInput:
    try:
        sampling = Sampling(temperature=1.0 if body.temperature is None else body.temperature,
                            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                            seed=secrets.randbits(63) if body.seed is None else body.seed,
                            max_tokens=config.default_max_tokens if max_tokens is None else max_tokens,
                            stop=body.stop_strings(), ignore_eos=body.ignore_eos,
                            presence_penalty=body.presence_penalty or 0.0,
                            frequency_penalty=body.frequency_penalty or 0.0,
                            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                            min_p=body.min_p or 0.0, logit_bias=_logit_bias(body), min_tokens=body.min_tokens,
                            stop_token_ids=tuple(body.stop_token_ids or ()), logprobs=scores.completion,
                            prompt_logprobs=scores.prompt, constraint=constraint, n=body.n)
    except InvalidRequest as error:
        raise _api_error(error) from None
    return GenerateInput(f"{prefix}-{uuid.uuid4().hex[:24]}", prompt, messages, sampling, best_of=best_of)


def _logit_bias(body: _Common) -> tuple[tuple[int, float], ...]:
    try:
        return body.logit_bias_items()
    except ValueError as error:
        raise ApiError(400, str(error), "logit_bias") from None


async def _respond(gateway: Callable[[], Gateway], lifecycle: Lifecycle, jobs: list[GenerateInput], body: _Common,
                   form: ResponseFormat, request: Request) -> Any:
    """Run the request (n choices per prompt, as one response whose choice i * n + c is choice c
    of prompt i); errors before the first token get a proper HTTP status, and a client that hangs
    up before the response starts stops the work (disconnect.py)."""
    try:
        end_work = lifecycle.begin()
    except ServiceError as error:
        raise _api_error(error) from None
    span = tracer.start_span(f"gateway.http.{form.endpoint}", kind=SpanKind.SERVER,
                             attributes={"request.id": [job.request_id for job in jobs], "request.label": jobs[0].name})
    end_work = _ending_span(span, end_work)
    core = gateway()
    choices = len(jobs) * body.n
    outputs = _indexed(merged([core.generate(job) for job in jobs]), body.n)
    collected: list[Indexed] | None = None  # None: the client hung up first
    try:
        with trace.use_span(span, end_on_exit=False):  # worker calls made now join this trace
            with suppress(ClientDisconnected):  # not an error of ours to record on the span
                collected = await unless_disconnected(request.receive, _opening(outputs, whole=not body.stream))
    except BaseException as error:
        api_error = _api_error(error) if isinstance(error, Exception) else None
        if api_error is not None:
            span.set_status(Status(StatusCode.ERROR, api_error.body["error"]["message"]))
        await _close(outputs, end_work)
        if api_error is not None:
            raise api_error from None
        raise
    if collected is None:
        span.set_status(Status(StatusCode.ERROR, "the client disconnected"))
        await _close(outputs, end_work)
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it
    if body.stream:
        return StreamingResponse(_sse(collected[0], outputs, form, body.include_usage and choices, end_work, span),
                                 media_type="text/event-stream")
    end_work()
    return JSONResponse(form.whole(collected, choices))


async def _close(outputs: AsyncGenerator[Indexed, None], end_work: Callable[[], None]) -> None:
    """Close the request's calls; its work ends (and its span) whatever closing raises."""
    try:
        await outputs.aclose()
    finally:
        end_work()


async def _opening(outputs: AsyncGenerator[Indexed, None], whole: bool) -> list[Indexed]:
    """The first output, or every output for a response sent whole."""
    first = await anext(outputs)
    return [first, *[output async for output in outputs]] if whole else [first]


async def _indexed(outputs: AsyncGenerator[Indexed, None], n: int) -> AsyncGenerator[Indexed, None]:
    """Each output under its response choice index; the prompt's tokens count once in usage (in
    choice 0's), not once per choice."""
    async with aclosing(outputs) as stream:
        async for prompt, output in stream:
            if output.choice and output.usage is not None:
                output = replace(output, usage=replace(output.usage, prompt_tokens=0))
            yield prompt * n + output.choice, output


def _ending_span(span: trace.Span, end_work: Callable[[], None]) -> Callable[[], None]:
    def end() -> None:
        span.end()
        end_work()
    return end


async def _sse(first: Indexed, outputs: AsyncGenerator[Indexed, None], form: ResponseFormat, usage_after: int,
               end_work: Callable[[], None], span: trace.Span) -> AsyncIterator[str]:
    """Server-sent events; with `usage_after` > 0, one usage chunk (summed over the choices) once
    that many generations finished. A failure after the first event is reported in the stream and
    on the request's span (this runs in the response's own task, outside that span's context)."""
    usages: list[Usage] = []
    try:
        async with aclosing(outputs) as stream:
            yield _event(form.first())
            async for index, output in _prepend(first, stream):
                if output.text or output.finish_reason or output.logprobs or output.prompt_logprobs:
                    yield _event(form.delta(output, index))
                if output.usage is not None and usage_after:
                    usages.append(output.usage)
                    if len(usages) == usage_after:
                        yield _event(form.usage_chunk(usages))
    except Exception as error:  # noqa: BLE001 - the status line is sent; report in the stream
        api_error = _api_error(error)
        span.set_status(Status(StatusCode.ERROR, api_error.body["error"]["message"]))
        yield _event(api_error.body)
    finally:
        end_work()
    yield "data: [DONE]\n\n"


async def _prepend(first: Indexed, rest: AsyncIterator[Indexed]) -> AsyncIterator[Indexed]:
    yield first
    async for output in rest:
        yield output


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
