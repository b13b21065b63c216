"""The async client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from types import TracebackType

import grpc

from services.client.types import (
    Completion,
    GatewayError,
    GenerateChunk,
    Guided,
    LogitControls,
    RetryPolicy,
    auth_metadata,
    build_request,
    join,
    to_chunk,
    join_choices,
    Message,
)
from services.common.errors import call_status
from services.common.pb import common_pb2, gateway_pb2_grpc
from services.common.tls import client_channel, client_files


class GatewayClient:
    def __init__(self, address: str | Sequence[str] = "127.0.0.1:50051", *, api_key: str | None = None,
                 timeout_seconds: float | None = None, retry: RetryPolicy = RetryPolicy(), tls: bool = False,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 tls_server_name: str | None = None) -> None:
        """`address`: one gateway (host:port), or several (a comma separated list or a sequence):
        then calls go round robin to the gateways whose health is SERVING, so one that drains
        after SIGTERM, restarts or is down is passed over (a call it refused is retried on another
        by `retry`). TLS is on with `tls_ca` (the CA to verify the gateway with), `tls_cert` and
        `tls_key` (a client certificate, for a gateway that requires one) or `tls=True` (the
        system's roots); with several gateways every certificate must name the first one's host,
        or set `tls_server_name`."""
        self._channel = client_channel(grpc.aio, address, client_files(tls, tls_ca, tls_cert, tls_key,
                                                                       tls_server_name))
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._metadata = auth_metadata(api_key)
        self._timeout = timeout_seconds
        self._retry = retry

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, prompt: str | Sequence[int] | None = None, *,
                       messages: Sequence[Message] | None = None,
                       max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                       top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False,
                       request_id: str = "", timeout: float | None = None,
                       max_cache_budget_mb: float = 0.0,
                       controls: LogitControls | None = None, logprobs: int | None = None,
                       prompt_logprobs: int | None = None,
                       guided: Guided | None = None, n: int | None = None, best_of: int = 0,
                       tools: Sequence[Mapping[str, Any]] = (), tool_choice: str = "",
                       cache_salt: str = "") -> AsyncIterator[GenerateChunk]:
        """Stream a completion of `prompt`, or of a chat `messages` list of (role, content).
        `timeout` (seconds) bounds the whole call; `max_cache_budget_mb` caps the KV the request
        may hold while others need the decode pool. Failures raise GatewayError."""
        request = build_request(prompt, messages, max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos,
                                request_id, max_cache_budget_mb, controls, logprobs=logprobs,
                                prompt_logprobs=prompt_logprobs, guided=guided, n=n, best_of=best_of,
                                tools=tools, tool_choice=tool_choice, cache_salt=cache_salt)
        for attempt in range(self._retry.max_retries + 1):
            call = self._stub.Generate(request, timeout=timeout or self._timeout, metadata=self._metadata)
            received = False
            try:
                async for response in call:
                    received = True
                    yield to_chunk(response)
                return
            except grpc.aio.AioRpcError as error:
                code, details = call_status(error)
                if received or code not in self._retry.retry_codes or attempt == self._retry.max_retries:
                    raise GatewayError(code, details) from None
                await asyncio.sleep(self._retry.backoff(attempt))
            finally:
                call.cancel()

    async def complete(self, prompt: str | Sequence[int] | None = None, **options: object) -> Completion:
        """The whole completion (same options as generate)."""
        return join([chunk async for chunk in self.generate(prompt, **options)])  # type: ignore[arg-type]

    async def choices(self, prompt: str | Sequence[int] | None = None, **options: object) -> list[Completion]:
        """Every choice of a request with n= (and best_of=), whole, in choice order."""
        return join_choices([chunk async for chunk in self.generate(prompt, **options)])  # type: ignore[arg-type]

    async def model_info(self, timeout: float | None = None) -> common_pb2.ModelInfo:
        try:
            return await self._stub.GetModelInfo(common_pb2.ModelInfoRequest(), timeout=timeout or self._timeout,
                                                 metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise GatewayError(*call_status(error)) from None
