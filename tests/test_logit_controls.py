"""Penalties, logit bias, min_p, min_tokens and stop token ids: each equals its Hugging Face logits
processor (in the sampler, and greedy through the services against `generate` with the same
processor), and values out of range get 400 / INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import random
from typing import Any

import grpc
import httpx
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from services.client import GatewayClient, GatewayError, LogitControls
from services.common.errors import InvalidRequest
from services.common.logit_controls import TokenContext, apply_controls
from services.common.runtime import ModelRuntime
from services.common.sampling import Sampling, sample
from services.gateway.text import PromptEncoder
from tests.conftest import RunningStack

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "List the colors of the rainbow: red, orange,"
NEW_TOKENS = 10
VOCAB = 500


class OpenAiPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the completion (Hugging Face has none)."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for row, ids in enumerate(input_ids[:, self.prompt_length :]):
            if ids.numel():
                tokens, counts = torch.unique(ids, return_counts=True)
                scores[row, tokens] -= self.frequency * counts.float() + self.presence
        return scores


def _history(rng: random.Random) -> tuple[list[int], int]:
    tokens = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 40))]
    return tokens, rng.randrange(0, len(tokens) + 1)


def _hf(processor: LogitsProcessor, tokens: list[int], logits: torch.Tensor) -> torch.Tensor:
    return processor(torch.tensor([tokens]), logits.clone()[None])[0]


@pytest.mark.parametrize("case", ["repetition", "bias", "min_tokens", "penalties"])
def test_each_control_equals_its_hugging_face_processor(case: str) -> None:
    rng = random.Random(case)
    for _ in range(50):
        tokens, start = _history(rng)
        logits, eos = torch.randn(VOCAB) * 5, frozenset({rng.randrange(VOCAB)})
        context, completion = TokenContext(tokens, start, eos), len(tokens) - start
        if case == "repetition":
            penalty = rng.choice([0.5, 1.3, 2.0])
            params, hf = Sampling(repetition_penalty=penalty), RepetitionPenaltyLogitsProcessor(penalty)
        elif case == "bias":
            bias = tuple(sorted({rng.randrange(VOCAB): rng.uniform(-100, 100) for _ in range(5)}.items()))
            params = Sampling(logit_bias=bias)
            hf = SequenceBiasLogitsProcessor({(token,): value for token, value in bias})
        elif case == "min_tokens":
            params = Sampling(min_tokens=rng.randrange(0, 10), max_tokens=16)
            hf = MinNewTokensLengthLogitsProcessor(start, params.min_tokens, list(eos))
        else:
            presence, frequency = rng.uniform(-2, 2), rng.uniform(-2, 2)
            params = Sampling(presence_penalty=presence, frequency_penalty=frequency)
            hf = OpenAiPenalties(start, presence, frequency)
        ours = apply_controls(logits, params, completion, context)
        torch.testing.assert_close(ours, _hf(hf, tokens, logits), rtol=0, atol=1e-5)


def test_min_p_samples_only_tokens_near_the_most_likely() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(0))
    params = Sampling(temperature=0.7, min_p=0.2, seed=1)
    probs = torch.softmax(logits / 0.7, dim=-1)
    drawn = {sample(logits, params, position) for position in range(300)}
    assert all(probs[token] >= 0.2 * probs.max() for token in drawn)
    assert len(drawn) > 1  # it still samples


@pytest.mark.parametrize(("fields", "name"), [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"),
    ({"logit_bias": ((3, 101.0),)}, "logit_bias"), ({"logit_bias": ((3, 1.0), (3, 2.0))}, "logit_bias"),
    ({"min_tokens": 17}, "min_tokens"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids"),
])
def test_controls_out_of_range_are_refused_naming_them(fields: dict[str, Any], name: str) -> None:
    with pytest.raises(InvalidRequest, match=f"^{name}"):
        Sampling(max_tokens=16, **fields)


REPETITIVE = "one two one two one two one two"


def _greedy_cases(encoder: PromptEncoder) -> dict[str, tuple[str, LogitControls, dict[str, Any]]]:
    """Per control: a prompt whose greedy output it changes, the control, and generate's options."""
    repetitive_length = len(encoder.encode_text(REPETITIVE))
    comma = encoder.encode_text(",")[0]
    return {
        "repetition_penalty": (REPETITIVE, LogitControls(repetition_penalty=1.4), {"repetition_penalty": 1.4}),
        "logit_bias": (PROMPT, LogitControls(logit_bias={comma: -100.0}), {"sequence_bias": {(comma,): -100.0}}),
        "penalties": (REPETITIVE, LogitControls(presence_penalty=1.5, frequency_penalty=0.5),
                      {"logits_processor": LogitsProcessorList([OpenAiPenalties(repetitive_length, 1.5, 0.5)])}),
    }


@pytest.mark.parametrize("case", ["repetition_penalty", "logit_bias", "penalties"])
async def test_greedy_output_with_a_control_equals_hf_generate_with_its_processor(
        memory_stack: RunningStack, runtime: ModelRuntime, encoder: PromptEncoder, case: str) -> None:
    prompt, controls, hf_options = _greedy_cases(encoder)[case]
    expected = runtime.reference_generate(encoder.encode_text(prompt), NEW_TOKENS, **hf_options)
    assert expected != runtime.reference_generate(encoder.encode_text(prompt), NEW_TOKENS)  # the control matters
    async with GatewayClient(memory_stack["gateway"]) as client:
        result = await client.complete(prompt, max_tokens=NEW_TOKENS, temperature=0, controls=controls)
    assert result.token_ids == expected


async def test_min_tokens_holds_off_the_end_of_sequence(memory_stack: RunningStack, runtime: ModelRuntime,
                                                        encoder: PromptEncoder) -> None:
    messages = [("user", "Reply with one word: yes or no?")]
    prompt_ids = encoder.encode_chat(messages)
    natural = runtime.reference_generate(prompt_ids, 24)
    assert natural[-1] in encoder.eos_token_ids and len(natural) < 20  # ends on its own, early
    minimum = len(natural) + 3
    expected = runtime.reference_generate(prompt_ids, 24, min_new_tokens=minimum)
    async with GatewayClient(memory_stack["gateway"]) as client:
        result = await client.complete(messages=messages, max_tokens=24, temperature=0,
                                       controls=LogitControls(min_tokens=minimum))
    assert result.token_ids == expected and len(expected) >= minimum


async def test_a_stop_token_id_ends_the_completion_without_its_text(memory_stack: RunningStack,
                                                                   runtime: ModelRuntime,
                                                                   encoder: PromptEncoder) -> None:
    reference = runtime.reference_generate(encoder.encode_text(PROMPT), NEW_TOKENS)
    stop_at = reference.index(reference[3])
    async with GatewayClient(memory_stack["gateway"]) as client:
        result = await client.complete(PROMPT, max_tokens=NEW_TOKENS, temperature=0,
                                       controls=LogitControls(stop_token_ids=[reference[3]]))
    assert result.token_ids == reference[: stop_at + 1] and result.finish_reason == "stop"
    assert result.text == encoder.tokenizer.decode(reference[:stop_at], skip_special_tokens=True)


async def test_http_controls_equal_the_grpc_ones(memory_stack: RunningStack, encoder: PromptEncoder) -> None:
    comma = encoder.encode_text(",")[0]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "presence_penalty": 1.5,
            "frequency_penalty": 0.5, "logit_bias": {str(comma): -100}}
    response = httpx.post(memory_stack["http"] + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    async with GatewayClient(memory_stack["gateway"]) as client:
        result = await client.complete(PROMPT, max_tokens=NEW_TOKENS, temperature=0, controls=LogitControls(
            presence_penalty=1.5, frequency_penalty=0.5, logit_bias={comma: -100.0}))
    assert response.json()["choices"][0]["text"] == result.text


@pytest.mark.parametrize(("extra", "param"), [
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 2}, "min_p"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1, " 5": 2}}, "logit_bias"),
    ({"min_tokens": 9}, "min_tokens"),
    ({"stop_token_ids": [99999999]}, "stop_token_ids"),
])
def test_http_controls_out_of_range_get_400_naming_them(memory_stack: RunningStack, extra: dict, param: str) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **extra}
    response = httpx.post(memory_stack["http"] + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("controls", [LogitControls(repetition_penalty=-1.0),
                                      LogitControls(logit_bias={99_999_999: 1.0}),
                                      LogitControls(stop_token_ids=[99_999_999])])
async def test_grpc_controls_out_of_range_get_invalid_argument(memory_stack: RunningStack,
                                                               controls: LogitControls) -> None:
    async with GatewayClient(memory_stack["gateway"]) as client:
        with pytest.raises(GatewayError) as caught:
            await client.complete(PROMPT, max_tokens=4, controls=controls)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
