"""Log-probabilities of generated and prompt tokens (OpenAI's logprobs, top_logprobs and echo): they
equal log_softmax of Hugging Face's own logits for the same tokens, through every path (prefill +
decode, kvstore handoff, unified), in OpenAI's response shapes over HTTP, streamed and not; values
out of range get 400 / INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import json
import math
from typing import Any

import grpc
import httpx
import pytest
import torch

from services.client import GatewayClient, GatewayError, TokenLogprob
from services.common.errors import InvalidRequest
from services.common.runtime import ModelRuntime
from services.common.sampling import Sampling
from services.common.scoring import token_logprob
from services.gateway.text import PromptEncoder
from tests.conftest import RunningStack

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
NEW_TOKENS = 5
TOLERANCE = 1e-4  # the decode's paged attention differs from HF's in the last bits (see the README)


def _reference(runtime: ModelRuntime, tokens: list[int]) -> torch.Tensor:
    """Hugging Face's log_softmax at every position of `tokens` (row i scores token i + 1)."""
    with torch.inference_mode():
        logits = runtime.model(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _assert_matches(entry: TokenLogprob, reference: torch.Tensor, token_id: int, top_n: int) -> None:
    assert entry.token_id == token_id
    assert math.isclose(entry.logprob, float(reference[token_id]), abs_tol=TOLERANCE)
    value = reference[token_id]
    assert int((reference > value + TOLERANCE).sum()) + 1 <= entry.rank <= int((reference >= value - TOLERANCE).sum())
    assert len(entry.top) == top_n
    expected_top = reference.topk(top_n).values.tolist()
    for (top_id, value), expected in zip(entry.top, expected_top, strict=True):  # ties may swap ids, never values
        assert math.isclose(value, expected, abs_tol=TOLERANCE)
        assert math.isclose(value, float(reference[top_id]), abs_tol=TOLERANCE)


def test_a_token_logprob_is_log_softmax_with_its_rank_and_alternatives() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0, -1.0])
    entry = token_logprob(logits, 2, 3)
    expected = torch.log_softmax(logits, dim=-1)
    assert entry.logprob == pytest.approx(float(expected[2]))
    assert entry.rank == 3  # two tokens are more likely
    assert [token for token, _ in entry.top][:1] in ([1], [3]) and len(entry.top) == 3
    assert [value for _, value in entry.top] == pytest.approx(sorted(expected.tolist(), reverse=True)[:3])
    assert token_logprob(logits, 1, 0).top == () and token_logprob(logits, 1, 0).rank == 1


def test_prompt_scores_equal_hugging_face_whole_and_in_chunks(runtime: ModelRuntime, encoder: PromptEncoder) -> None:
    ids = encoder.encode_text("Paris is the capital of France, and Berlin is the capital of Germany.")
    reference = _reference(runtime, ids)
    last, scored = runtime.prefill_scored(ids, lambda *_: None, ids[1:], 2)
    assert torch.equal(last, runtime.prefill(ids, lambda *_: None))  # scoring leaves the first token alone
    assert [entry.logprob for entry in scored] == [float(reference[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    cache, split = runtime.new_cache(), 7  # a chunked prefill scores each chunk's last position too
    _, first = runtime.prefill_scored(ids[:split], lambda *_: None, ids[1 : split + 1], 2, cache)
    _, rest = runtime.prefill_scored(ids[split:], lambda *_: None, ids[split + 1 :], 2, cache)
    for position, entry in enumerate(first + rest):
        _assert_matches(entry, reference[position], ids[position + 1], 2)


@pytest.mark.parametrize("value", [-1, 21])
def test_logprobs_out_of_range_are_refused_naming_them(value: int) -> None:
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(InvalidRequest, match=f"^{name} must be in"):
            Sampling(**{name: value})


@pytest.mark.parametrize("gateway", ["gateway", "gateway_kvstore", "gateway_unified"])
async def test_greedy_logprobs_through_the_services_equal_hugging_face(
        memory_stack: RunningStack, runtime: ModelRuntime, encoder: PromptEncoder, gateway: str) -> None:
    prompt_ids = encoder.encode_text(PROMPT)
    expected = runtime.reference_generate(prompt_ids, NEW_TOKENS)
    async with GatewayClient(memory_stack[gateway]) as client:
        result = await client.complete(PROMPT, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=3,
                                       prompt_logprobs=2)
    assert result.token_ids == expected
    reference = _reference(runtime, prompt_ids + expected)
    assert result.prompt_logprobs is not None and len(result.prompt_logprobs) == len(prompt_ids) - 1
    for position, entry in enumerate(result.prompt_logprobs):
        _assert_matches(entry, reference[position], prompt_ids[position + 1], 2)
    assert len(result.logprobs) == NEW_TOKENS
    for index, entry in enumerate(result.logprobs):
        _assert_matches(entry, reference[len(prompt_ids) - 1 + index], expected[index], 3)


async def test_sampled_tokens_get_the_logprobs_of_the_raw_logits(memory_stack: RunningStack, runtime: ModelRuntime,
                                                                  encoder: PromptEncoder) -> None:
    """Temperature and penalties change which token is drawn, not the reported distribution."""
    async with GatewayClient(memory_stack["gateway"]) as client:
        result = await client.complete(PROMPT, max_tokens=NEW_TOKENS, temperature=1.5, seed=7, ignore_eos=True,
                                       logprobs=1)
    reference = _reference(runtime, encoder.encode_text(PROMPT) + result.token_ids)
    start = len(encoder.encode_text(PROMPT)) - 1
    for index, entry in enumerate(result.logprobs):
        _assert_matches(entry, reference[start + index], result.token_ids[index], 1)
    assert result.prompt_logprobs is None


@pytest.mark.parametrize("options", [{"logprobs": 21}, {"prompt_logprobs": 99}])
async def test_grpc_logprobs_out_of_range_get_invalid_argument(memory_stack: RunningStack,
                                                              options: dict[str, int]) -> None:
    async with GatewayClient(memory_stack["gateway"]) as client:
        with pytest.raises(GatewayError) as caught:
            await client.complete(PROMPT, max_tokens=2, **options)  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert next(iter(options)) in caught.value.details()


def _post(stack: RunningStack, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(stack["http"] + path, json={"model": MODEL, **body}, timeout=120)


def _events(response: httpx.Response) -> list[dict[str, Any]]:
    lines = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_http_completion_logprobs_with_echo_score_the_prompt_too(memory_stack: RunningStack, runtime: ModelRuntime,
                                                                  encoder: PromptEncoder) -> None:
    """What lm-evaluation-harness asks for a loglikelihood: echo, logprobs=1, one new token."""
    prompt_ids = encoder.encode_text(PROMPT)
    response = _post(memory_stack, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0,
                                                       "echo": True, "logprobs": 1})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"].startswith(PROMPT)
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(prompt_ids) + 2
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["tokens"][: len(prompt_ids)] == [encoder.tokenizer.decode([t]) for t in prompt_ids]
    reference = _reference(runtime, prompt_ids)
    for position in range(1, len(prompt_ids)):
        assert logprobs["token_logprobs"][position] == pytest.approx(
            float(reference[position - 1, prompt_ids[position]]), abs=TOLERANCE)
        top = logprobs["top_logprobs"][position]  # the top token, and the prompt's own if it is not it
        assert max(top.values()) == pytest.approx(float(reference[position - 1].max()), abs=TOLERANCE)
        assert logprobs["tokens"][position] in top
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])


def test_http_streamed_logprobs_equal_the_whole_response(memory_stack: RunningStack) -> None:
    body = {"prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "logprobs": 2, "ignore_eos": True}
    whole = _post(memory_stack, "/v1/completions", body).json()["choices"][0]["logprobs"]
    streamed = _post(memory_stack, "/v1/completions", {**body, "stream": True})
    chunks = [event["choices"][0]["logprobs"] for event in _events(streamed) if event["choices"]]
    joined = {key: [value for chunk in chunks if chunk for value in chunk[key]] for key in whole}
    assert joined == whole and len(whole["tokens"]) == NEW_TOKENS


def test_http_chat_logprobs_in_openai_shape(memory_stack: RunningStack) -> None:
    body = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 3, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    content = _post(memory_stack, "/v1/chat/completions", body).json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2 and entry["logprob"] <= entry["top_logprobs"][0]["logprob"] + 1e-6
    streamed = _events(_post(memory_stack, "/v1/chat/completions", {**body, "stream": True}))
    assert [e for event in streamed if event["choices"] and event["choices"][0]["logprobs"]
            for e in event["choices"][0]["logprobs"]["content"]] == content


@pytest.mark.parametrize(("path", "extra", "param"), [
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
])
def test_http_logprobs_out_of_range_get_400_naming_them(memory_stack: RunningStack, path: str,
                                                       extra: dict[str, Any], param: str) -> None:
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    response = _post(memory_stack, path, {**body, "max_tokens": 2, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
