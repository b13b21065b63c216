"""Prefix caching on the prefill worker: full prompt blocks named by a chained hash (the documented
scheme), kept in memory least recently used first; a prompt is computed from its first block not
kept, and the result equals the uncached one. Tenants (API keys, cache salts) share nothing unless
sharing is turned on; bad salts are 400 / INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
from typing import Any

import google_crc32c
import grpc
import httpx
import pytest
import torch
from prometheus_client import CollectorRegistry

from services.client import GatewayClient, GatewayError
from services.common.errors import InvalidRequest
from services.common.kv_codec import tensor_bytes
from services.common.pb import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from services.common.prefix_keys import block_keys, check_salt
from services.common.runtime import ModelRuntime
from services.gateway.text import PromptEncoder
from services.prefill.prefix_cache import KvRecorder, PrefixCache, PrefixCacheMetrics, PrefixHit
from services.prefill.prefix_store import PrefixStore
from tests.conftest import API_KEY, RunningStack, add_service

MODEL = "SmolLM2-135M-Instruct"


def test_block_keys_follow_the_documented_scheme() -> None:
    ids = list(range(100, 140))  # two full blocks of 16 and 8 tokens left over
    keys = block_keys(ids, 16, "abc", "salt")
    head = struct.pack("<H", 3) + b"abc" + struct.pack("<H", 4) + b"salt"
    first = hashlib.sha256(head + struct.pack("<16I", *ids[:16]))
    second = hashlib.sha256(first.digest() + head + struct.pack("<16I", *ids[16:32]))
    assert keys == [first.hexdigest(), second.hexdigest()]
    assert block_keys(ids, 16, "abc", "other")[0] != keys[0] and block_keys(ids, 16, "xyz", "salt")[0] != keys[0]
    assert block_keys([7, *ids[1:]], 16, "abc", "salt")[1] != keys[1]  # a block's name depends on all before it


def test_bad_salts_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="at most 256 bytes"):
        check_salt("é" * 129)
    with pytest.raises(InvalidRequest, match="must be a string"):
        check_salt(5)
    with pytest.raises(InvalidRequest, match="valid Unicode"):  # a lone surrogate, which JSON can carry
        check_salt("\ud800")


def _block(value: float) -> torch.Tensor:
    return torch.full((2, 2, 1, 16, 4), float(value))


BLOCK_BYTES = 2 * 2 * 1 * 16 * 4 * 4  # a _block, float32


def _cache(blocks: int) -> PrefixCache:
    return PrefixCache(blocks * BLOCK_BYTES, 16, "fp", BLOCK_BYTES, PrefixCacheMetrics.create(CollectorRegistry()))


def test_the_cache_finds_the_longest_prefix_and_keeps_chain_beginnings_longest() -> None:
    cache = _cache(3)
    prompt = list(range(50))  # 49 tokens may be cached: 3 full blocks
    miss = cache.lookup(prompt, "")
    assert miss.tokens == 0 and len(miss.keys) == 3 and cache.wanted(miss) == [0, 1, 2]
    cache.insert([(key, _block(i)) for i, key in enumerate(miss.keys)], miss.keys)
    hit = cache.lookup(prompt, "")
    assert hit.tokens == 48 and torch.equal(hit.layer_kv(1)[0][:, 16:32], _block(1)[1, 0])
    assert cache.lookup(prompt[:40], "").tokens == 32 and cache.lookup(prompt, "tenant").tokens == 0
    other = cache.lookup([9, *prompt[1:]], "")
    cache.insert([(other.keys[0], _block(9))], other.keys[:1])  # over budget: one block must go
    # the end of the older chain goes, not its beginning (without which no block after it is reachable)
    assert cache.blocks == 3 and cache.lookup(prompt, "").tokens == 32
    assert cache.lookup(list(range(16)), "").keys == []  # the last token is always computed


def test_a_hit_is_a_whole_number_of_forward_chunks_whatever_the_block_size() -> None:
    """A chunked prefill resumes at a forward-chunk boundary: the hit is rounded to a multiple of
    both the chunk and the block (a block size that does not divide the chunk once sent no KV for
    part of the prompt)."""
    cache = _cache(8)
    prompt = list(range(120))
    keys = cache.lookup(prompt, "").keys
    cache.insert([(key, _block(i)) for i, key in enumerate(keys)], keys)
    assert cache.lookup(prompt, "").tokens == 112 and cache.lookup(prompt, "", unit=48).tokens == 96
    assert cache.lookup(prompt, "", unit=40).tokens == 80  # lcm(40, 16)


def test_a_prompt_larger_than_the_budget_stores_only_what_fits() -> None:
    cache = _cache(2)
    assert cache.wanted(cache.lookup(list(range(100)), "")) == [0, 1]


def test_the_recorder_copies_only_the_rows_to_store() -> None:
    """Views would keep the forward pass's whole cache alive until the blocks are stored."""
    seen: list[int] = []
    recorder = KvRecorder(PrefixHit([], [], 16), lambda layer, *_: seen.append(layer), (16, 32))
    keys = torch.arange(2 * 48 * 4, dtype=torch.float32).reshape(2, 48, 4)
    recorder(0, keys, keys.clone())
    recorded = recorder.layers[0][0]
    assert seen == [0] and recorded.shape == (2, 16, 4) and torch.equal(recorded, keys[:, 16:32])
    assert recorded.untyped_storage().data_ptr() != keys.untyped_storage().data_ptr()


async def _hits(prefill: str) -> int:
    async with grpc.aio.insecure_channel(prefill) as channel:
        stats = await prefill_pb2_grpc.PrefillServiceStub(channel).Stats(common_pb2.StatsRequest(), timeout=10)
    return stats.prefix_hit_tokens_total


async def test_a_repeated_prompt_computes_only_its_last_block_and_answers_the_same(
        memory_stack: RunningStack, runtime: ModelRuntime, encoder: PromptEncoder) -> None:
    prompt = "A repeated prompt about lighthouses, harbours and the ships that pass them at night: "
    ids = encoder.encode_text(prompt)
    expected = runtime.reference_generate(ids, 8)
    async with GatewayClient(memory_stack["gateway"]) as client:
        before = await _hits(memory_stack["prefill"])
        first = await client.complete(prompt, max_tokens=8, temperature=0, ignore_eos=True)
        middle = await _hits(memory_stack["prefill"])
        second = await client.complete(prompt, max_tokens=8, temperature=0, ignore_eos=True)
    assert middle == before and await _hits(memory_stack["prefill"]) - middle == (len(ids) - 1) // 16 * 16 > 0
    assert first.token_ids == second.token_ids == expected


async def test_the_next_chat_turn_reuses_the_whole_previous_prompt(memory_stack: RunningStack,
                                                                   encoder: PromptEncoder) -> None:
    turn = [("system", "You answer questions about the solar system in one short sentence."),
            ("user", "Which planet is the largest?")]
    async with GatewayClient(memory_stack["gateway"]) as client:
        answer = await client.complete(messages=turn, max_tokens=12, temperature=0)
        before = await _hits(memory_stack["prefill"])
        await client.complete(messages=[*turn, ("assistant", answer.text), ("user", "And the smallest?")],
                              max_tokens=4, temperature=0)
    assert await _hits(memory_stack["prefill"]) - before >= (len(encoder.encode_chat(turn)) - 1) // 16 * 16


async def _decode_hits(decode: str) -> int:
    async with grpc.aio.insecure_channel(decode) as channel:
        stats = await decode_pb2_grpc.DecodeServiceStub(channel).Stats(common_pb2.StatsRequest(), timeout=10)
    return stats.prefix_hit_tokens


def _post(http: str, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    # json.dumps escapes a lone surrogate as JSON may (httpx's json= would refuse to send it)
    content = json.dumps({"model": MODEL, "max_tokens": 2, "temperature": 0, **body})
    return httpx.post(http + "/v1/completions", content=content, headers=headers, timeout=120)


async def test_api_keys_share_nothing_unless_sharing_is_on(memory_stack: RunningStack) -> None:
    prompt = {"prompt": "Tenants must not learn from timing what another tenant asked: a secret merger of two "
                        "shipping companies, planned for the spring, between the northern and the southern ports."}
    keyed, shared = memory_stack["http_keyed"], memory_stack["http_shared"]
    steps = [(keyed, API_KEY, False), (keyed, API_KEY, True), (keyed, "another-key", False),
             (shared, API_KEY, False), (shared, "another-key", True)]
    for http, key, hits in steps:  # on the prefill and on the decode alike
        before = (await _hits(memory_stack["prefill"]), await _decode_hits(memory_stack["decode"]))
        assert _post(http, prompt, key).status_code == 200
        after = (await _hits(memory_stack["prefill"]), await _decode_hits(memory_stack["decode"]))
        assert (after[0] > before[0], after[1] > before[1]) == (hits, hits), (http, key)


async def test_a_request_salt_separates_and_matches(memory_stack: RunningStack) -> None:
    prompt = ("Salted prompts share blocks only with the same salt, whatever else they have in common, even "
              "when every one of their words is the same as another prompt's words.")
    for salt, hits in (("a", False), ("b", False), ("a", True)):
        before = await _hits(memory_stack["prefill"])
        assert _post(memory_stack["http"], {"prompt": prompt, "cache_salt": salt}).status_code == 200
        assert (await _hits(memory_stack["prefill"]) > before) == hits, salt


@pytest.mark.parametrize("salt", ["x" * 257, 5, ["a"], "\ud800"])
def test_http_bad_cache_salt_is_400(memory_stack: RunningStack, salt: Any) -> None:
    response = _post(memory_stack["http"], {"prompt": "Hi", "cache_salt": salt})
    assert response.status_code == 400 and response.json()["error"]["param"] == "cache_salt"


async def test_grpc_bad_cache_salt_is_invalid_argument(memory_stack: RunningStack) -> None:
    async with GatewayClient(memory_stack["gateway"]) as client:
        with pytest.raises(GatewayError) as caught:
            await client.complete("Hi", max_tokens=2, cache_salt="x" * 257)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in caught.value.details()


def test_a_damaged_block_in_the_kvstore_is_not_used(runtime: ModelRuntime) -> None:
    store = PrefixStore(None, runtime.geometry, 16, 60)  # type: ignore[arg-type]  # only decoding here
    block = torch.randn(runtime.geometry.num_layers, 2, runtime.geometry.num_kv_heads, 16, runtime.geometry.head_dim)
    data = tensor_bytes(block)
    good = data + struct.pack("<I", google_crc32c.value(data))
    assert torch.equal(store._decode(good), block)  # type: ignore[arg-type]
    assert store._decode(good[:-5] + b"\0" + good[-4:]) is None  # a flipped byte
    assert store._decode(good[:-8]) is None  # a short value


async def test_another_prefill_worker_finds_the_blocks_in_the_kvstore(memory_stack: RunningStack,
                                                                      runtime: ModelRuntime,
                                                                      encoder: PromptEncoder) -> None:
    """A second prefill worker (as a restarted one) holds nothing in memory: it loads the prompt's
    blocks that the first worker wrote to the kvstore, and answers the same."""
    prompt = ("Both prefill workers read and write the same kvstore, so a prompt computed by one of them is "
              "a prompt the other one, or a restarted one, does not compute again: it loads the blocks")
    ids = encoder.encode_text(prompt)
    workers = [add_service(memory_stack, f"prefill_tier{i}", "prefill", "--prefix-cache-kvstore", "on")
               for i in (1, 2)]
    first_gateway, gateway = (add_service(memory_stack, f"gateway_tier{i}", "gateway", "--prefill-addresses", worker)
                              for i, worker in zip((1, 2), workers, strict=True))
    second = workers[1]
    async with GatewayClient(first_gateway) as client:
        first = await client.complete(prompt, max_tokens=6, temperature=0, ignore_eos=True)
    await asyncio.sleep(2)  # the first worker writes its blocks to the kvstore in the background
    before = await _hits(second)
    async with GatewayClient(gateway) as client:
        again = await client.complete(prompt, max_tokens=6, temperature=0, ignore_eos=True)
    assert await _hits(second) - before == (len(ids) - 1) // 16 * 16 > 0
    assert again.token_ids == first.token_ids == runtime.reference_generate(ids, 6)
