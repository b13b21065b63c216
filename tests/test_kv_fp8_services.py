"""fp8 on the wire through real services: a prefill with `--kv-wire-encoding fp8` next to the memory
stack's decode (direct and kvstore paths) agrees with the raw path's greedy output above a
measured floor, and a request whose KV is not finite fails at the prefill with DATA_LOSS."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from safetensors.torch import load_file, save_file

from services.client import GatewayClient
from services.common.model_files import (
    DIGEST_FILE,
    default_cache_dir,
    resolve_model_dir,
)
from services.common.pb import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from services.stack import ServiceSpec, Stack, free_port
from tests.conftest import PROMPTS, RunningStack, add_service, start_healthy
from tests.kv_helpers import read_tokens
from tests.test_kv_fp8 import assert_idle_soon

NEW_TOKENS = 16
# Share of positions where the fp8 output equals the raw path's (5 prompts x 16 tokens). Measured:
# 0.74 with this stack's 4-token chunks (first divergences at 5, 8, 13 and none twice; the same in
# process, `services.bench.fp8_agreement --chunk-tokens 4 --chunk-layers 8`); garbled KV would keep
# little beyond the first token, which the prefill samples. Margin for another CPU's rounding.
AGREEMENT_FLOOR = 0.5


@pytest.fixture(scope="module")
def fp8(memory_stack: RunningStack) -> dict[str, str]:
    """An fp8 prefill beside the memory stack's (same chunking, checkpoints to its kvstore), and
    gateways that send it their prompts: KV straight to the decode, and through the kvstore."""
    prefill = add_service(memory_stack, "prefill_fp8", "prefill", "--kv-wire-encoding", "fp8")
    return {"prefill": prefill,
            "direct": add_service(memory_stack, "gateway_fp8", "gateway", "--prefill-addresses", prefill),
            "kvstore": add_service(memory_stack, "gateway_fp8_kvstore", "gateway", "--prefill-addresses", prefill,
                                   "--kv-transfer", "kvstore")}


@pytest.fixture(scope="module")
async def references(memory_stack: RunningStack) -> dict[str, list[int]]:
    """The raw path's greedy output (equal to Hugging Face `generate`: tests/test_exactness.py)."""
    async with GatewayClient(memory_stack["gateway"]) as client:
        return {prompt: (await client.complete(prompt, max_tokens=NEW_TOKENS, temperature=0)).token_ids
                for prompt in PROMPTS}


def _identical(a: list[int], b: list[int]) -> int:
    return sum(x == y for x, y in zip(a, b, strict=False))


async def test_fp8_prefill_moves_one_byte_per_value(memory_stack, fp8, encoder, references) -> None:
    prompt = encoder.encode_text(PROMPTS[0])
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    async with grpc.aio.insecure_channel(memory_stack["decode"]) as d, grpc.aio.insecure_channel(fp8["prefill"]) as p:
        generation = decode_pb2_grpc.DecodeServiceStub(d).Generate(decode_pb2.DecodeRequest(
            request_id="fp8-bytes", prompt_token_ids=prompt, sampling=sampling,
            kv_source=decode_pb2.KV_SOURCE_DIRECT), timeout=60)
        assert (await generation.read()).HasField("accepted")
        events = [event async for event in prefill_pb2_grpc.PrefillServiceStub(p).Prefill(prefill_pb2.PrefillRequest(
            request_id="fp8-bytes", prompt_token_ids=prompt, decode_address=memory_stack["decode"],
            sampling=sampling), timeout=60)]
        tokens = await read_tokens(generation)
        g = await decode_pb2_grpc.DecodeServiceStub(d).GetModelInfo(common_pb2.ModelInfoRequest())
    assert events[-1].done.kv_bytes == len(prompt) * g.num_layers * 2 * g.num_kv_heads * g.head_dim  # not 4x
    assert tokens[0] == references[PROMPTS[0]][0]  # sampled from the prefill's exact logits


@pytest.mark.parametrize("path", ["direct", "kvstore"])
async def test_fp8_greedy_output_agrees_with_the_raw_path(fp8, path, references) -> None:
    identical = total = 0
    async with GatewayClient(fp8[path]) as client:
        for prompt in PROMPTS:
            ids = (await client.complete(prompt, max_tokens=NEW_TOKENS, temperature=0)).token_ids
            assert ids[0] == references[prompt][0], prompt
            identical += _identical(ids, references[prompt])
            total += max(len(ids), len(references[prompt]))
    assert identical / total >= AGREEMENT_FLOOR


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A prefill (fp8, two layers a chunk) and a decode serving a copy of the tiny model
    whose last layer computes non-finite values: its first layer group encodes, its second cannot."""
    source, model = resolve_model_dir("tiny", default_cache_dir()), tmp_path_factory.mktemp("poisoned-tiny")
    for path in source.iterdir():
        if path.suffix != ".safetensors" and path.name != DIGEST_FILE:
            shutil.copy(path, model / path.name)
    weights = load_file(source / "model.safetensors")
    weights["model.layers.3.self_attn.v_proj.weight"][0] = float("inf")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    decode = _spec("decode", model)
    prefill = _spec("prefill", model, "--kv-wire-encoding", "fp8", "--kv-chunk-layers", "2")
    logs = tmp_path_factory.mktemp("poisoned-logs")
    stack = Stack([decode, prefill], log_dir=str(logs))
    start_healthy(stack, logs)
    yield {spec.name: spec.address for spec in stack.specs}
    stack.stop()


def _spec(role: str, model: Path, *extra: str) -> ServiceSpec:
    port = free_port()
    return ServiceSpec(role, role, port, ("--port", str(port), "--metrics-port", "0", "--model", str(model),
                                          "--log-level", "DEBUG", *extra))


async def test_non_finite_kv_is_refused_at_the_prefill(poisoned) -> None:
    """A retry's prefill (its first token known, so the non-finite logits are never sampled, which
    would fail the request with INTERNAL first) stops at the chunk fp8 cannot carry."""
    prompt, sampling = list(range(1, 9)), common_pb2.SamplingParams(temperature=0, max_tokens=4)
    async with grpc.aio.insecure_channel(poisoned["decode"]) as d, grpc.aio.insecure_channel(poisoned["prefill"]) as p:
        decode, prefill = decode_pb2_grpc.DecodeServiceStub(d), prefill_pb2_grpc.PrefillServiceStub(p)
        generation = decode.Generate(decode_pb2.DecodeRequest(
            request_id="poisoned", prompt_token_ids=prompt, sampling=sampling,
            kv_source=decode_pb2.KV_SOURCE_DIRECT), timeout=60)
        assert (await generation.read()).HasField("accepted")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in prefill.Prefill(prefill_pb2.PrefillRequest(
                    request_id="poisoned", prompt_token_ids=prompt, decode_address=poisoned["decode"],
                    sampling=sampling, known_first_token=42), timeout=60):
                pass
        assert refused.value.code() == grpc.StatusCode.DATA_LOSS
        details = refused.value.details()
        assert "not finite" in details and "fp8" in details and "layers 2-3" in details  # the first group was fine
        generation.cancel()
        await assert_idle_soon(prefill)
        await assert_idle_soon(decode)
