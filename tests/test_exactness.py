"""The master test: greedy output through the services equals Hugging Face `generate`."""

from __future__ import annotations

import asyncio

import pytest

from services.client import GatewayClient
from services.common.runtime import ModelRuntime
from services.gateway.text import PromptEncoder
from tests.conftest import PROMPTS

NEW_TOKENS = 32


@pytest.fixture(scope="session")
def references(runtime: ModelRuntime, encoder: PromptEncoder) -> dict[str, list[int]]:
    return {prompt: runtime.reference_generate(encoder.encode_text(prompt), NEW_TOKENS) for prompt in PROMPTS}


@pytest.mark.parametrize("gateway", ["gateway", "gateway_kvstore"], ids=["direct", "via-kvstore"])
@pytest.mark.parametrize("stack_name", ["memory_stack", "redis_stack"], ids=["memory", "redis"])
async def test_greedy_output_equals_hf_generate(request: pytest.FixtureRequest, stack_name: str, gateway: str,
                                                references: dict[str, list[int]], encoder: PromptEncoder) -> None:
    stack = request.getfixturevalue(stack_name)
    async with GatewayClient(stack[gateway]) as client:
        for prompt in PROMPTS:
            result = await client.complete(prompt, max_tokens=NEW_TOKENS, temperature=0)
            ids, text, last = result.token_ids, result.text, result
            assert ids == references[prompt], prompt
            assert text == encoder.tokenizer.decode(ids, skip_special_tokens=True)
            assert last.usage is not None
            assert last.usage.completion_tokens == len(ids)
            assert last.usage.prompt_tokens == len(encoder.encode_text(prompt))
            assert last.finish_reason == ("length" if len(ids) == NEW_TOKENS else "stop")


async def test_eight_concurrent_requests_are_all_exact(memory_stack, references: dict[str, list[int]]) -> None:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    async with GatewayClient(memory_stack["gateway"]) as client:
        results = await asyncio.gather(*(client.complete(p, max_tokens=NEW_TOKENS, temperature=0) for p in prompts))
    for prompt, result in zip(prompts, results):
        ids = result.token_ids
        assert ids == references[prompt]


async def test_chat_request_uses_the_chat_template(memory_stack, runtime: ModelRuntime,
                                                   encoder: PromptEncoder) -> None:
    messages = [("user", "What is the capital of France?")]
    prompt_ids = encoder.encode_chat(messages)
    assert encoder.tokenizer.decode(prompt_ids).startswith("<|im_start|>")
    async with GatewayClient(memory_stack["gateway"]) as client:
        last = await client.complete(messages=messages, max_tokens=16, temperature=0)
        ids = last.token_ids
    assert ids == runtime.reference_generate(prompt_ids, 16)
    assert last.usage.prompt_tokens == len(prompt_ids)


async def test_seeded_sampling_is_repeatable_across_kv_paths(memory_stack) -> None:
    options = dict(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    async with GatewayClient(memory_stack["gateway"]) as direct, \
            GatewayClient(memory_stack["gateway_kvstore"]) as stored:
        first = (await direct.complete("Once upon a time", **options)).token_ids
        again = (await direct.complete("Once upon a time", **options)).token_ids
        via_store = (await stored.complete("Once upon a time", **options)).token_ids
        other_seed = (await direct.complete("Once upon a time", **{**options, "seed": 99})).token_ids
    assert first == again == via_store
    assert len(first) == 24
    assert other_seed != first


async def test_stop_string_cuts_the_text(memory_stack) -> None:
    async with GatewayClient(memory_stack["gateway"]) as client:
        full = await client.complete("The capital of France is", max_tokens=32, temperature=0)
        full_ids, full_text = full.token_ids, full.text
        assert "." in full_text
        last = await client.complete("The capital of France is", max_tokens=32, temperature=0, stop=["."])
    ids, text = last.token_ids, last.text
    assert text == full_text[: full_text.index(".")]
    assert last.finish_reason == "stop"
    assert ids == full_ids[: len(ids)]
