"""Prompt lists and token-id prompts, as vLLM accepts them: each prompt is its own generation and
choice i answers prompt i; token ids are completed as they are, over HTTP and gRPC alike."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest

from services.client import GatewayClient, GatewayError
from tests.conftest import RunningStack
from tests.test_openai_api import disconnect_after_events

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "Two plus two equals"]


def _complete(stack: RunningStack, prompt: object, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, **extra}
    return httpx.post(stack["http"] + "/v1/completions", json=body, timeout=120)


def test_token_id_prompts_equal_their_text_and_hf(memory_stack: RunningStack, runtime, encoder) -> None:
    ids = encoder.encode_text(PROMPTS[0])
    expected = encoder.tokenizer.decode(runtime.reference_generate(ids, 6), skip_special_tokens=True)
    for prompt in (ids, [ids]):
        response = _complete(memory_stack, prompt)
        assert response.status_code == 200, response.text
        assert [c["text"] for c in response.json()["choices"]] == [expected]
        assert response.json()["usage"]["prompt_tokens"] == len(ids)


async def test_token_ids_over_grpc_equal_hf(memory_stack: RunningStack, runtime, encoder) -> None:
    ids = encoder.encode_text(PROMPTS[1])
    async with GatewayClient(memory_stack["gateway"]) as client:
        result = await client.complete(ids, max_tokens=5, temperature=0)
        assert result.token_ids == runtime.reference_generate(ids, 5)
        with pytest.raises(GatewayError) as refused:
            await client.complete([1, 10 ** 8], max_tokens=2)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_tokens[1]" in str(refused.value)


def test_a_prompt_list_answers_each_prompt_in_its_choice(memory_stack: RunningStack) -> None:
    singles = [_complete(memory_stack, p).json() for p in PROMPTS]
    both = _complete(memory_stack, PROMPTS).json()
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert [c["text"] for c in both["choices"]] == [s["choices"][0]["text"] for s in singles]
    assert both["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in singles)
    assert both["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)


def test_a_streamed_prompt_list_interleaves_choices_and_sums_usage(memory_stack: RunningStack) -> None:
    whole = _complete(memory_stack, PROMPTS).json()
    body = {"model": MODEL, "prompt": PROMPTS, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    texts, usages = ["", ""], []
    with httpx.stream("POST", memory_stack["http"] + "/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                for choice in event["choices"]:
                    texts[choice["index"]] += choice["text"]
                if event.get("usage"):
                    usages.append(event["usage"])
    assert texts == [c["text"] for c in whole["choices"]]
    assert usages == [whole["usage"]]


@pytest.mark.parametrize(("prompt", "param"), [
    ([], "prompt"), ([10 ** 9], "prompt_tokens"), ([[]], "prompt_tokens"), (["a", 1], "prompt"),
    (["x"] * 65, "prompt"), (["fine", ""], "prompt"),
])
def test_bad_prompt_lists_are_400_naming_the_field(memory_stack: RunningStack, prompt: object, param: str) -> None:
    response = _complete(memory_stack, prompt)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


async def test_disconnecting_from_a_prompt_list_frees_every_generation(memory_stack: RunningStack) -> None:
    body = {"model": MODEL, "prompt": ["Tell me a story", "Tell me a poem"], "max_tokens": 300, "temperature": 0,
            "stream": True, "ignore_eos": True}
    assert await disconnect_after_events(memory_stack, body, 6) == {"decode": (0, 0), "prefill": (0, 0),
                                                                     "gateway": (0, 0)}
