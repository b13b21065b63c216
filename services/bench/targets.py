"""The servers a benchmark can drive: this project's gateway over gRPC, or any OpenAI-compatible
HTTP endpoint (this gateway's, vLLM's, ...). Each records when every piece of a response arrived."""

from __future__ import annotations

import json
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from services.bench.workload import BenchRequest
from services.client import GatewayClient


@dataclass(slots=True)
class RequestRecord:
    started: float
    token_times: list[float] = field(default_factory=list)  # arrival of each streamed piece with text
    completion_tokens: int = 0
    finished: float = 0.0
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.started

    @property
    def e2e(self) -> float:
        return self.finished - self.started

    @property
    def tpot(self) -> float:
        """(e2e - TTFT) / (tokens - 1): the decode speed one user sees."""
        return (self.finished - self.token_times[0]) / (self.completion_tokens - 1) if self.completion_tokens > 1 \
            else 0.0

    @property
    def itls(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.token_times, self.token_times[1:])]


class Target(Protocol):
    async def send(self, request: BenchRequest) -> RequestRecord: ...

    async def close(self) -> None: ...


class GrpcTarget:
    def __init__(self, address: str, api_key: str | None, tls: dict[str, Any] | None = None) -> None:
        self._client = GatewayClient(address, api_key=api_key, **(tls or {}))  # tls: the SDK's tls_* arguments

    async def send(self, request: BenchRequest) -> RequestRecord:
        record = RequestRecord(time.perf_counter())
        try:
            async for chunk in self._client.generate(request.prompt, max_tokens=request.max_tokens, temperature=0,
                                                     ignore_eos=True, cache_salt=request.cache_salt):
                if chunk.token_ids:
                    record.token_times.append(time.perf_counter())
                if chunk.usage is not None:
                    record.completion_tokens = chunk.usage.completion_tokens
        except Exception as error:  # noqa: BLE001 - a failed request is a figure too
            record.error = str(error)
        record.finished = time.perf_counter()
        return record

    async def close(self) -> None:
        await self._client.close()


class OpenAITarget:
    """POST /v1/completions with stream=true and stream_options.include_usage."""

    def __init__(self, base_url: str, model: str, api_key: str | None, verify: ssl.SSLContext | bool = True) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=600, verify=verify)
        self._model = model

    async def send(self, request: BenchRequest) -> RequestRecord:
        body = {"model": self._model, "prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
                **({"cache_salt": request.cache_salt} if request.cache_salt else {})}
        record = RequestRecord(time.perf_counter())
        try:
            async with self._http.stream("POST", "/completions", json=body) as response:
                if response.status_code != 200:
                    record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                else:
                    await self._read(response, record)
        except httpx.HTTPError as error:
            record.error = repr(error)
        record.finished = time.perf_counter()
        return record

    @staticmethod
    async def _read(response: httpx.Response, record: RequestRecord) -> None:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("text"):
                record.token_times.append(time.perf_counter())
            if event.get("usage"):
                record.completion_tokens = event["usage"]["completion_tokens"]
        record.completion_tokens = record.completion_tokens or len(record.token_times)

    async def close(self) -> None:
        await self._http.aclose()
