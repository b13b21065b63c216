"""Bad requests at the gateway get INVALID_ARGUMENT with a message naming the field."""

from __future__ import annotations

import grpc
import pytest

from services.client import GatewayClient, GatewayError


@pytest.mark.parametrize(("prompt", "options", "field"), [
    ("", {}, "prompt"),
    ("hello " * 9000, {"max_tokens": 4}, "context"),
    ("The capital of France is", {"max_tokens": 0}, "max_tokens"),
    ("The capital of France is", {"max_tokens": 5000}, "max_tokens"),
    ("hello " * 4500, {"max_tokens": 4000}, "context"),
    ("The capital of France is", {"temperature": -0.5}, "temperature"),
    ("The capital of France is", {"top_p": 0.0}, "top_p"),
    ("The capital of France is", {"top_p": 1.5}, "top_p"),
    ("The capital of France is", {"request_id": "bad id!"}, "request_id"),
], ids=["empty-prompt", "prompt-too-long", "max-tokens-zero", "max-tokens-over-limit", "over-context",
        "negative-temperature", "top-p-zero", "top-p-above-one", "bad-request-id"])
async def test_bad_request_is_invalid_argument(memory_stack, prompt: str, options: dict, field: str) -> None:
    async with GatewayClient(memory_stack["gateway"]) as client:
        with pytest.raises(GatewayError) as caught:
            await client.complete(prompt, **options)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()


async def test_bad_chat_role_is_invalid_argument(memory_stack) -> None:
    async with GatewayClient(memory_stack["gateway"]) as client:
        with pytest.raises(GatewayError) as caught:
            await client.complete(messages=[("wizard", "hi")])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "role" in caught.value.details()
