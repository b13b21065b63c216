"""Python SDK of the gateway's gRPC API: typed results, streaming iterators, per-call deadlines,
retries on UNAVAILABLE with backoff, API keys. Async and sync flavours:

    async with GatewayClient("127.0.0.1:50051", api_key=None) as client:
        async for chunk in client.generate("The capital of France is", max_tokens=16, temperature=0):
            print(chunk.text, end="")

    with SyncGatewayClient("127.0.0.1:50051") as client:
        print(client.complete("The capital of France is", max_tokens=16, temperature=0).text)
"""

from services.client.aio import GatewayClient
from services.client.sync import SyncGatewayClient
from services.client.types import (Completion, GatewayError, GenerateChunk, Guided, LogitControls, RetryPolicy,
                                   ToolCall, Usage)
from services.common.logprobs import TokenLogprob

__all__ = ["Completion", "GatewayClient", "GatewayError", "GenerateChunk", "Guided", "LogitControls", "RetryPolicy",
           "SyncGatewayClient", "TokenLogprob", "ToolCall", "Usage"]
