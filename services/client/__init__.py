"""Async Python client of the gateway's gRPC API, with typed results.

    async with GatewayClient("127.0.0.1:50051") as client:
        async for chunk in client.generate("The capital of France is", max_tokens=16, temperature=0):
            print(chunk.text, end="")
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc

from services.common.pb import common_pb2, gateway_pb2, gateway_pb2_grpc

_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class GenerateChunk:
    """One streamed step: new token ids and text; the last chunk has finish_reason and usage."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    usage: Usage | None


class GatewayClient:
    def __init__(self, address: str = "127.0.0.1:50051", timeout_seconds: float | None = None) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._timeout = timeout_seconds

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, prompt: str | None = None, *, messages: Sequence[tuple[str, str]] | None = None,
                       max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                       top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (),
                       ignore_eos: bool = False, request_id: str = "") -> AsyncIterator[GenerateChunk]:
        """Stream a completion of `prompt`, or of a chat `messages` list of (role, content)."""
        sampling = common_pb2.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                             max_tokens=max_tokens, stop=list(stop), ignore_eos=ignore_eos)
        request = gateway_pb2.GenerateRequest(sampling=sampling, request_id=request_id)
        if messages is not None:
            request.chat.CopyFrom(gateway_pb2.ChatMessages(
                messages=[gateway_pb2.ChatMessage(role=role, content=content) for role, content in messages]))
        else:
            request.prompt = prompt or ""
        call = self._stub.Generate(request, timeout=self._timeout)
        try:
            async for response in call:
                usage = response.usage if response.HasField("usage") else None
                yield GenerateChunk(response.request_id, list(response.token_ids), response.text,
                                    _FINISH.get(response.finish_reason),
                                    Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
                                    if usage else None)
        finally:
            call.cancel()

    async def complete(self, prompt: str | None = None, **options: object) -> tuple[list[int], str, GenerateChunk]:
        """The whole completion: (token ids, text, last chunk)."""
        ids: list[int] = []
        parts: list[str] = []
        last: GenerateChunk | None = None
        async for chunk in self.generate(prompt, **options):  # type: ignore[arg-type]
            ids.extend(chunk.token_ids)
            parts.append(chunk.text)
            last = chunk
        if last is None:
            raise RuntimeError("the gateway closed the stream without a response")
        return ids, "".join(parts), last
