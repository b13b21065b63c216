"""The blocking client (plain gRPC, no event loop)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
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
from services.common.pb import gateway_pb2_grpc
from services.common.tls import client_channel, client_files


class SyncGatewayClient:
    def __init__(self, address: str | Sequence[str] = "127.0.0.1:50051", *, api_key: str | None = None,
                 timeout_seconds: float | None = None, retry: RetryPolicy = RetryPolicy(), tls: bool = False,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 tls_server_name: str | None = None) -> None:
        """`address` and TLS as in GatewayClient: one gateway or several; `tls_ca`,
        `tls_cert`/`tls_key`, `tls_server_name`, `tls=True`."""
        self._channel = client_channel(grpc, address, client_files(tls, tls_ca, tls_cert, tls_key, tls_server_name))
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._metadata = auth_metadata(api_key)
        self._timeout = timeout_seconds
        self._retry = retry

    def __enter__(self) -> SyncGatewayClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: str | Sequence[int] | None = None, *,
                       messages: Sequence[Message] | None = None,
                 max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                 top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False,
                 request_id: str = "", timeout: float | None = None,
                 max_cache_budget_mb: float = 0.0, controls: LogitControls | None = None, logprobs: int | None = None,
                 prompt_logprobs: int | None = None,
                 guided: Guided | None = None, n: int | None = None, best_of: int = 0,
                 tools: Sequence[Mapping[str, Any]] = (), tool_choice: str = "",
                       cache_salt: str = "") -> Iterator[GenerateChunk]:
        """Stream a completion (see GatewayClient.generate)."""
        request = build_request(prompt, messages, max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos,
                                request_id, max_cache_budget_mb, controls, logprobs=logprobs,
                                prompt_logprobs=prompt_logprobs, guided=guided, n=n, best_of=best_of,
                                tools=tools, tool_choice=tool_choice, cache_salt=cache_salt)
        for attempt in range(self._retry.max_retries + 1):
            call = self._stub.Generate(request, timeout=timeout or self._timeout, metadata=self._metadata)
            received = False
            try:
                for response in call:
                    received = True
                    yield to_chunk(response)
                return
            except grpc.RpcError as error:
                code, details = call_status(error)
                if received or code not in self._retry.retry_codes or attempt == self._retry.max_retries:
                    raise GatewayError(code, details) from None
                time.sleep(self._retry.backoff(attempt))
            finally:
                call.cancel()

    def complete(self, prompt: str | Sequence[int] | None = None, **options: object) -> Completion:
        return join(list(self.generate(prompt, **options)))  # type: ignore[arg-type]

    def choices(self, prompt: str | Sequence[int] | None = None, **options: object) -> list[Completion]:
        """Every choice of a request with n= (and best_of=), whole, in choice order."""
        return join_choices(list(self.generate(prompt, **options)))  # type: ignore[arg-type]
