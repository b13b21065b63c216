"""Nothing a client asks for is silently ignored: unimplemented controls (and implemented ones given
a value of the wrong type) are refused with 400 naming them (their neutral values and harmless
metadata pass), and vLLM's /tokenize and /detokenize work with the model's tokenizer."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import RunningStack

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Say hi"}]


@pytest.mark.parametrize(("path", "extra", "param"), [
    ("/v1/completions", {"frequency_penalty": "high"}, "frequency_penalty"),
    ("/v1/completions", {"suffix": "x"}, "suffix"),
    ("/v1/completions", {"made_up_field": 1}, "made_up_field"),
    ("/v1/chat/completions", {"guided_grammar": "root ::= \"a\""}, "guided_grammar"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
])
def test_an_unimplemented_control_is_refused_naming_it(memory_stack: RunningStack, path: str, extra: dict,
                                                       param: str) -> None:
    body = {"model": MODEL, "max_tokens": 2, **({"messages": CHAT} if "chat" in path else {"prompt": PROMPT}), **extra}
    response = httpx.post(memory_stack["http"] + path, json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_chat_message_field_this_server_does_not_use_is_refused(memory_stack: RunningStack) -> None:
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi", "name": "bob"}]}
    response = httpx.post(memory_stack["http"] + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert "name" in response.json()["error"]["message"]


def test_neutral_values_and_metadata_are_accepted(memory_stack: RunningStack) -> None:
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1, "logit_bias": {},
               "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "user": "u-1",
               "metadata": {"team": "a"}, "store": False, "guided_regex": "", "guided_json": {},
               "guided_choice": [], "guided_grammar": ""}
    body = {"model": MODEL, "max_tokens": 2, "temperature": 0, "messages": CHAT, **neutral}
    response = httpx.post(memory_stack["http"] + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text


def test_tokenize_and_detokenize_use_the_served_tokenizer(memory_stack: RunningStack, encoder) -> None:
    http = memory_stack["http"]
    text = httpx.post(http + "/tokenize", json={"model": MODEL, "prompt": PROMPT}, timeout=30).json()
    assert text["tokens"] == encoder.encode_text(PROMPT) and text["count"] == len(text["tokens"])
    assert text["max_model_len"] == encoder.max_model_len
    chat = httpx.post(http + "/tokenize", json={"messages": CHAT}, timeout=30).json()
    assert chat["tokens"] == encoder.encode_chat([("user", "Say hi")])
    back = httpx.post(http + "/detokenize", json={"tokens": text["tokens"]}, timeout=30).json()
    assert back["prompt"] == encoder.tokenizer.decode(text["tokens"])
    models = httpx.get(http + "/v1/models", timeout=30).json()
    assert models["data"][0]["max_model_len"] == encoder.max_model_len


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/tokenize", {"prompt": PROMPT, "messages": CHAT}, 400),
    ("/tokenize", {}, 400),
    ("/tokenize", {"prompt": PROMPT, "model": "gpt-9"}, 404),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("/detokenize", {"tokens": [10 ** 9]}, 400),
    ("/detokenize", {"tokens": [-1]}, 400),
    ("/detokenize", {"tokens": "abc"}, 400),
])
def test_bad_token_requests_get_openai_errors(memory_stack: RunningStack, path: str, body: dict,
                                              status: int) -> None:
    response = httpx.post(memory_stack["http"] + path, json=body, timeout=30)
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("extra", [{"tools": [{"type": "function", "function": {"name": "f"}}]},
                                   {"tool_choice": "required"}])
def test_tools_with_a_template_that_cannot_render_them_get_a_clear_400(memory_stack: RunningStack,
                                                                      extra: dict) -> None:
    body = {"model": MODEL, "max_tokens": 2, "messages": CHAT, **extra}
    response = httpx.post(memory_stack["http"] + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert "chat template has no tool support" in response.json()["error"]["message"]
