"""The OpenAI-compatible HTTP API, driven by the official `openai` client: exact greedy output,
usage, streaming, errors in OpenAI's shape, API keys, and disconnects that free everything."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import openai
import pytest

from services.common.healthcheck import health_status
from services.common.pb import common_pb2, decode_pb2_grpc
from services.stack import free_port
from tests.conftest import API_KEY, RunningStack, start_stack
from tests.test_cancel import _wait_until_idle

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(memory_stack: RunningStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=memory_stack["http"] + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(memory_stack: RunningStack, client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == [MODEL]
    assert httpx.get(memory_stack["http"] + "/health").json() == {"status": "ok"}


def test_completion_equals_hf_generate(client: openai.OpenAI, runtime, encoder) -> None:
    prompt_ids = encoder.encode_text(PROMPT)
    expected = runtime.reference_generate(prompt_ids, 16)
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    assert result.choices[0].text == encoder.tokenizer.decode(expected, skip_special_tokens=True)
    assert result.choices[0].finish_reason == ("length" if len(expected) == 16 else "stop")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(prompt_ids), len(expected))
    assert result.usage.total_tokens == len(prompt_ids) + len(expected)


def test_streamed_completion_equals_the_whole_one(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_equals_hf_generate_with_the_chat_template(client: openai.OpenAI, runtime, encoder) -> None:
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "What is 2+2?"}]
    prompt_ids = encoder.encode_chat([(m["role"], m["content"]) for m in messages])
    expected = runtime.reference_generate(prompt_ids, 20)
    result = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=20, temperature=0)
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == encoder.tokenizer.decode(expected, skip_special_tokens=True)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(prompt_ids), len(expected))
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == result.choices[0].message.content
    assert chunks[-1].usage.total_tokens == result.usage.total_tokens


def test_stop_and_seed(client: openai.OpenAI) -> None:
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0, stop=["."])
    assert "." not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    runs = [client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0.9,
                                      seed=7).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]


def test_the_openai_client_gets_n_choices(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0.8, seed=3, n=2)
    assert [choice.index for choice in chat.choices] == [0, 1] and chat.usage.completion_tokens == 8
    best = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0.8, seed=3, n=1,
                                     best_of=3)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": MODEL, "prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": PROMPT, "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": PROMPT, "n": 0}, 400, "n"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": "lots"}, 400, "max_tokens"),
    ({"model": "gpt-9", "prompt": PROMPT}, 404, "model"),
])
def test_bad_requests_get_openai_errors(memory_stack: RunningStack, body: dict, status: int, param: str) -> None:
    response = httpx.post(memory_stack["http"] + "/v1/completions", json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_malformed_json_is_400(memory_stack: RunningStack) -> None:
    response = httpx.post(memory_stack["http"] + "/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_client_errors_map_to_openai_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT)


def test_api_keys_guard_http_and_grpc(memory_stack: RunningStack) -> None:
    url = memory_stack["http_keyed"] + "/v1"
    for key in (None, "wrong-key"):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        response = httpx.post(url + "/completions", json={"model": MODEL, "prompt": PROMPT}, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong-key", max_retries=0).models.list()
    keyed = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0)
    assert keyed.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0).usage.completion_tokens


async def test_disconnect_mid_stream_frees_everything(memory_stack: RunningStack) -> None:
    body = {"model": MODEL, "prompt": "Tell me a story", "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    assert await disconnect_after_events(memory_stack, body, 5) == {"decode": (0, 0), "prefill": (0, 0),
                                                                     "gateway": (0, 0)}


async def test_hanging_up_on_a_whole_response_frees_everything(memory_stack: RunningStack) -> None:
    """A client that closes its connection while it waits for a completion sent whole (no stream)
    stops the generation: uvicorn does not cancel the route handler, so before, the decode went on
    to the last of its 4,000 tokens for nobody (minutes on a CPU; the wait below gives it ~10 s)."""
    body = json.dumps({"model": MODEL, "prompt": "Tell me a story", "max_tokens": 4000, "temperature": 0,
                       "ignore_eos": True}).encode()
    admitted_before = await _decode_requests_total(memory_stack)
    host, port = memory_stack["http"].removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    deadline = time.monotonic() + 60
    while await _decode_requests_total(memory_stack) == admitted_before:  # this request admitted, decoding
        assert time.monotonic() < deadline, "the request never reached the decode"
        await asyncio.sleep(0.05)
    writer.close()  # hang up without reading
    await writer.wait_closed()
    assert await _wait_until_idle(memory_stack) == {"decode": (0, 0), "prefill": (0, 0), "gateway": (0, 0)}


async def _decode_requests_total(stack: RunningStack) -> int:
    async with grpc.aio.insecure_channel(stack["decode"]) as channel:
        return (await decode_pb2_grpc.DecodeServiceStub(channel).Stats(common_pb2.StatsRequest())).requests_total


async def disconnect_after_events(stack: RunningStack, body: dict, events: int) -> dict[str, tuple[int, int]]:
    """Stream a completion, hang up after `events` server-sent events; what each service then holds."""
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", stack["http"] + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data: ")
                if seen == events:
                    break
    return await _wait_until_idle(stack)


@pytest.fixture(scope="module")
def capacity_stack(tmp_path_factory: pytest.TempPathFactory) -> RunningStack:
    """Tiny model; the decode takes one request at a time; a second gateway has no live decode."""
    dead, http, dead_http = free_port(), free_port(), free_port()
    running = start_stack(tmp_path_factory.mktemp("capacity"), "tiny",
                          extra={"decode": ("--max-active-requests", "1"), "gateway": ("--http-port", str(http))},
                          extra_gateways={"gateway_dead": ("--decode-addresses", f"127.0.0.1:{dead}",
                                                           "--http-port", str(dead_http))},
                          wait_for=("kvstore", "prefill", "decode", "gateway"))
    running.addresses |= {"http": f"http://127.0.0.1:{http}", "http_dead": f"http://127.0.0.1:{dead_http}"}
    deadline = time.monotonic() + 120  # the dead gateway never turns ready; wait until it is up
    while health_status(running["gateway_dead"], service="liveness") != 1:
        assert time.monotonic() < deadline, "gateway_dead did not start"
        time.sleep(0.1)
    yield running
    running.stack.stop()


async def test_no_capacity_is_429_and_no_worker_is_503(capacity_stack: RunningStack) -> None:
    body = {"model": "tiny-random-llama", "prompt": "Hello", "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", capacity_stack["http"] + "/v1/completions", json=body) as busy:
            assert busy.status_code == 200
            lines = busy.aiter_lines()  # keep it: a collected line iterator closes the stream
            await anext(lines)
            async with grpc.aio.insecure_channel(capacity_stack["decode"]) as channel:
                stats = await decode_pb2_grpc.DecodeServiceStub(channel).Stats(common_pb2.StatsRequest())
            assert stats.active_requests == 1  # the decode worker is full now
            full = await http.post(capacity_stack["http"] + "/v1/completions",
                                   json={**body, "stream": False, "max_tokens": 2})
            assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_error"
        down = await http.post(capacity_stack["http_dead"] + "/v1/completions",
                               json={**body, "stream": False, "max_tokens": 2})
        assert down.status_code == 503 and down.json()["error"]["message"]
    async with grpc.aio.insecure_channel(capacity_stack["decode"]) as channel:
        for _ in range(50):
            if (await decode_pb2_grpc.DecodeServiceStub(channel).Stats(common_pb2.StatsRequest())).active_requests == 0:
                break
            await asyncio.sleep(0.1)
        assert (await decode_pb2_grpc.DecodeServiceStub(channel).Stats(common_pb2.StatsRequest())).active_requests == 0

