"""Property-based fuzzing of every public RPC (hypothesis): random and mutated protobuf messages,
and raw bytes, sent to real services. Whatever arrives, the caller gets a gRPC status (never
UNKNOWN, never an unexplained INTERNAL), the service keeps SERVING, and the decode pool is empty
once the calls are over."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.healthcheck import health_status
from services.common.kv_wire import to_pb
from services.common.pb import (common_pb2, decode_pb2, decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc, kv_pb2,
                                kvstore_pb2, kvstore_pb2_grpc, prefill_pb2, prefill_pb2_grpc)
from tests.conftest import RunningStack, start_stack
from tests.kv_helpers import real_transfer

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_SECONDS = 30
_ids = itertools.count()
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 1e-38, 1.0]))
doubles = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1e308]))
uint32 = st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1))
uint64 = st.integers(0, 2**64 - 1)
enum_values = st.one_of(st.integers(0, 8), st.integers(-(2**31), 2**31 - 1))  # protobuf enums are int32
text = st.text(max_size=40)
token_ids = st.lists(st.one_of(st.integers(0, 200), st.integers(0, 2**32 - 1)), max_size=12)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running = start_stack(tmp_path_factory.mktemp("fuzz"), "tiny",
                          extra={"decode": ("--kv-pool-blocks", "64", "--kv-timeout-seconds", "5")})
    yield running
    running.stack.stop()


@pytest.fixture(scope="module")
def channels(stack: RunningStack) -> Iterator[dict[str, grpc.Channel]]:
    opened = {name: grpc.insecure_channel(stack[name]) for name in ("gateway", "prefill", "decode", "kvstore")}
    yield opened
    for channel in opened.values():
        channel.close()


def outcome(call: Callable[[], object]) -> grpc.StatusCode:
    """The status a call ends with (OK if it returns)."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            for _ in result:  # drain a stream
                pass
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def assert_pool_empty(channels: dict[str, grpc.Channel]) -> None:
    stub = decode_pb2_grpc.DecodeServiceStub(channels["decode"])
    for _ in range(100):
        stats = stub.Stats(common_pb2.StatsRequest(), timeout=10)
        if (stats.active_requests, stats.blocks_used) == (0, 0):
            return
        time.sleep(0.1)
    assert (stats.active_requests, stats.blocks_used) == (0, 0), stats


sampling = st.builds(common_pb2.SamplingParams, temperature=floats, top_p=floats, top_k=uint32, seed=uint64,
                     max_tokens=st.one_of(st.integers(0, 6), st.sampled_from([4097, 2**32 - 1])),
                     stop=st.lists(text, max_size=2), ignore_eos=st.booleans())
chat = st.builds(gateway_pb2.ChatMessages, messages=st.lists(st.builds(
    gateway_pb2.ChatMessage, role=st.sampled_from(["user", "system", "assistant", "", "wizard"]), content=text),
    max_size=3))


@st.composite
def generate_requests(draw: st.DrawFn) -> gateway_pb2.GenerateRequest:
    request = gateway_pb2.GenerateRequest(sampling=draw(sampling), request_id=draw(text),
                                          max_cache_budget_mb=draw(doubles))
    if draw(st.booleans()):
        request.prompt = draw(text)
    else:
        request.chat.CopyFrom(draw(chat))
    return request


@FUZZ
@given(request=generate_requests())
def test_gateway_generate_answers_any_request_with_a_status(stack, channels, request) -> None:
    stub = gateway_pb2_grpc.GatewayServiceStub(channels["gateway"])
    code = outcome(lambda: stub.Generate(request, timeout=CALL_SECONDS))
    assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}, code
    assert_pool_empty(channels)


@FUZZ
@given(request=st.builds(decode_pb2.DecodeRequest, request_id=text, prompt_token_ids=token_ids, sampling=sampling,
                         kv_source=st.sampled_from([0, 1, 2, 3, 7]), position_offset=uint32,
                         max_cache_budget_mb=doubles, client_request_id=text))
def test_decode_generate_answers_any_request_with_a_status(stack, channels, request) -> None:
    stub = decode_pb2_grpc.DecodeServiceStub(channels["decode"])
    if request.kv_source != decode_pb2.KV_SOURCE_LOCAL:  # nobody sends its KV: it would wait 5 s
        request.kv_source = decode_pb2.KV_SOURCE_LOCAL
    assert outcome(lambda: stub.Generate(request, timeout=CALL_SECONDS)) not in NEVER
    assert_pool_empty(channels)


@FUZZ
@given(request=st.builds(prefill_pb2.PrefillRequest, request_id=text, prompt_token_ids=token_ids, sampling=sampling,
                         store_kv=st.booleans(), position_offset=uint32, transfer_attempt=uint32,
                         client_request_id=text))
def test_prefill_answers_any_request_with_a_status(stack, channels, request) -> None:
    request.decode_address = stack["decode"]  # a decode that never admitted it: NOT_FOUND, never a hang
    stub = prefill_pb2_grpc.PrefillServiceStub(channels["prefill"])
    assert outcome(lambda: stub.Prefill(request, timeout=CALL_SECONDS)) not in NEVER
    assert_pool_empty(channels)


_FIELD_VALUES = st.one_of(st.integers(-(2**31), 2**32 - 1), text, st.binary(max_size=64))


@st.composite
def mutated_transfers(draw: st.DrawFn, model: common_pb2.ModelInfo, request_id: str) -> list[kv_pb2.KvTransferMessage]:
    """A valid transfer for the admitted request, with messages dropped, repeated, reordered or
    with one field of one message replaced."""
    messages = real_transfer(model, request_id, 4, 2, 2, first_token=draw(st.integers(0, 2**32 - 1)))
    index = draw(st.integers(0, len(messages) - 1))
    target = messages[index]
    fields = [f.name for f in dataclasses.fields(target)]
    name = draw(st.sampled_from(fields))
    wire = [to_pb(m) for m in messages]
    try:
        wire[index] = to_pb(dataclasses.replace(target, **{name: draw(_FIELD_VALUES)}))
    except Exception:  # noqa: BLE001 - a value the wire cannot carry: only the order is mutated
        pass
    return draw(st.permutations(wire)) if draw(st.booleans()) else draw(
        st.lists(st.sampled_from(wire), max_size=len(wire) + 2))


@FUZZ
@given(data=st.data())
def test_decode_transfer_answers_any_stream_with_a_status(stack, channels, data) -> None:
    stub = decode_pb2_grpc.DecodeServiceStub(channels["decode"])
    model = stub.GetModelInfo(common_pb2.ModelInfoRequest(), timeout=10)
    request_id = f"fuzzed-{next(_ids)}"
    generation = stub.Generate(decode_pb2.DecodeRequest(
        request_id=request_id, prompt_token_ids=[1, 2, 3, 4], kv_source=decode_pb2.KV_SOURCE_DIRECT,
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=2)), timeout=CALL_SECONDS)
    try:
        assert next(generation).HasField("accepted")
        _fuzz_transfer(stub, data, model, request_id)
    finally:
        generation.cancel()
    assert_pool_empty(channels)


def _fuzz_transfer(stub: decode_pb2_grpc.DecodeServiceStub, data: st.DataObject, model: common_pb2.ModelInfo,
                   request_id: str) -> None:
    messages = data.draw(st.one_of(mutated_transfers(model, request_id), st.lists(st.builds(
        kv_pb2.KvTransferMessage, layout=st.builds(kv_pb2.KvLayout, request_id=st.just(request_id),
                                                   num_layers=uint32, num_tokens=uint32, chunk_tokens=uint32,
                                                   chunk_layers=uint32, dtype=enum_values, encoding=enum_values,
                                                   transfer_attempt=uint32, chunks_in_kvstore=st.booleans())),
        max_size=3)))
    code = outcome(lambda: stub.TransferKv(iter(messages), timeout=CALL_SECONDS))
    assert code not in NEVER, code


@FUZZ
@given(namespace=text, key=text, value=st.binary(max_size=2048), ttl=uint32, prefix=text)
def test_kvstore_answers_any_request_with_a_status(stack, channels, namespace, key, value, ttl, prefix) -> None:
    stub = kvstore_pb2_grpc.KvStoreServiceStub(channels["kvstore"])
    put = outcome(lambda: stub.Put(kvstore_pb2.PutRequest(namespace=namespace, key=key, value=value,
                                                          ttl_seconds=ttl), timeout=CALL_SECONDS))
    assert put in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    got = outcome(lambda: stub.Get(kvstore_pb2.GetRequest(namespace=namespace, key=key), timeout=CALL_SECONDS))
    assert got in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
    deleted = outcome(lambda: stub.Delete(kvstore_pb2.DeleteRequest(namespace=namespace, keys=[key], prefix=prefix),
                                          timeout=CALL_SECONDS))
    assert deleted in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    stats = stub.Stats(common_pb2.StatsRequest(), timeout=10)
    assert stats.bytes_used <= stats.byte_budget


RAW_METHODS = [("gateway", "/disagg.v1.GatewayService/Generate", "unary_stream"),
               ("decode", "/disagg.v1.DecodeService/Generate", "unary_stream"),
               ("decode", "/disagg.v1.DecodeService/TransferKv", "stream_unary"),
               ("prefill", "/disagg.v1.PrefillService/Prefill", "unary_stream"),
               ("kvstore", "/disagg.v1.KvStoreService/Put", "unary_unary"),
               ("kvstore", "/disagg.v1.KvStoreService/Get", "unary_unary")]


@FUZZ
@given(method=st.sampled_from(RAW_METHODS), payload=st.lists(st.binary(max_size=300), min_size=1, max_size=3))
def test_raw_bytes_get_a_status_and_every_service_keeps_serving(stack, channels, method, payload) -> None:
    service, path, kind = method
    channel = channels[service]
    if kind == "stream_unary":
        call = channel.stream_unary(path)
        code = outcome(lambda: call(iter(payload), timeout=CALL_SECONDS))
    else:
        call = getattr(channel, kind)(path)
        code = outcome(lambda: call(payload[0], timeout=CALL_SECONDS))
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED  # never wedged
    assert health_status(stack[service]) == 1  # SERVING
    assert_pool_empty(channels)
