"""API keys: when the gateway is given keys, the HTTP API (Authorization: Bearer KEY) and the gRPC
API (metadata `authorization: Bearer KEY`, or `x-api-key: KEY`) require one of them."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from services.common.config import split_addresses
from services.common.errors import Unauthenticated
from services.common.prefix_keys import check_salt
from services.common.telemetry import ServiceTelemetry

log = logging.getLogger(__name__)


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(dict.fromkeys(key for key in keys if key))

    @classmethod
    def from_settings(cls, keys: str, keys_file: str) -> ApiKeys:
        """Keys from a comma separated list and/or a file with one key per line ('#' comments)."""
        found = split_addresses(keys)
        if keys_file:
            lines = Path(keys_file).read_text().splitlines()
            found += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return cls(found)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def announce(self) -> None:
        if self.enabled:
            log.info("API keys required (%d configured)", len(self._keys))
        else:
            log.warning("no API keys configured: the HTTP and gRPC APIs are open to anyone who can reach them")

    def check(self, presented: str | None) -> None:
        """Raise Unauthenticated unless keys are off or `presented` is one of them."""
        if not self.enabled:
            return
        if not presented:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        if not any(hmac.compare_digest(presented.encode(), key.encode()) for key in self._keys):
            raise Unauthenticated("invalid API key")

    def check_metadata(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        self.check(presented_key(metadata))


def cache_salt(api_key: str | None, requested: str, shared: bool) -> str:
    """A request's prefix-cache salt (services.common.prefix_keys): its API key's, unless the cache is
    shared across keys, and the salt the request asked for (at most 256 bytes), hashed into one."""
    check_salt(requested)
    tenant = "" if shared or not api_key else api_key
    if not tenant and not requested:
        return ""
    return hashlib.sha256(f"{tenant}\0{requested}".encode()).hexdigest()


def presented_key(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The API key a gRPC call presents (Authorization: Bearer, or x-api-key)."""
    headers = {key.lower(): value for key, value in metadata if isinstance(value, str)}
    return bearer(headers.get("authorization")) or headers.get("x-api-key")


def bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Checks the API key of every call to `service` before any handler runs, so no method can
    forget it; health checks and reflection stay open. A refused call ends UNAUTHENTICATED and is
    counted like any other call (`disagg_rpc_requests_total`)."""

    def __init__(self, keys: ApiKeys, service: str, telemetry: ServiceTelemetry) -> None:
        self._keys = keys
        self._prefix = f"/{service}/"
        self._telemetry = telemetry

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefix):
            return handler
        try:
            self._keys.check_metadata(details.invocation_metadata or ())
        except Unauthenticated as error:
            method = details.method.rsplit("/", 1)[-1]
            self._telemetry.requests.labels(self._telemetry.service, method, "UNAUTHENTICATED").inc()
            return _refusal(handler, str(error))
        return handler


def _refusal(handler: Any, message: str) -> Any:
    """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED."""
    async def refuse(_: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(_: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse_stream if handler.response_streaming else refuse,
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
