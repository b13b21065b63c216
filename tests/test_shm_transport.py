"""The shared-memory KV transport (tiny model, real processes): greedy output equals Hugging Face's
over shm; every bad slice gets a clear status and nothing is held; kill -9 of either side
mid-transfer leaves no segment of the transfer in /dev/shm once the reaper ran."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import signal
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from services.client import GatewayClient
from services.common import shm
from services.common.errors import TransportUnavailable
from services.common.kv_codec import KvChunk, KvLayout, encode_chunk
from services.common.kv_shm import ShmReceiver, ShmTransferWriter, choose_transport
from services.common.model_files import default_cache_dir, resolve_model_dir
from services.common.pb import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from services.common.shm_reaper import ShmReaper
from services.gateway.prefill_route import fault_role
from services.gateway.text import PromptEncoder
from services.stack import Stack
from tests.kv_helpers import Message, admit, read_tokens, real_transfer, send
from tests.membership_helpers import gateway_spec, worker_spec

PREFIX = f"test-shm-{uuid.uuid4().hex[:8]}"  # this module's prefill workers' segments
SENDER_PREFIX = f"test-sender-{uuid.uuid4().hex[:8]}"  # segments this test makes as a prefill would
NUM_TOKENS = 5
TEXT = "The capital of France is"
LONG_PROMPT = [(7 * i) % 4000 + 10 for i in range(1500)]  # many forward chunks: a transfer that lasts
_ids = itertools.count()


@pytest.fixture(scope="module")
def shm_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    chunking = ("--kv-chunk-tokens", "16", "--kv-chunk-layers", "1", "--prefill-chunk-tokens", "64",
                "--shm-prefix", PREFIX)
    specs = [worker_spec("decode", "decode"), worker_spec("decode_victim", "decode"),
             worker_spec("prefill", "prefill", "--kv-transport", "auto", "--shm-reap-interval-seconds", "0.2",
                         *chunking),
             worker_spec("prefill_victim", "prefill", "--kv-transport", "shm", *chunking)]
    specs.append(gateway_spec("gateway", "--prefill-addresses", specs[2].address, "--decode-addresses",
                              specs[0].address))
    stack = Stack(specs, log_dir=str(tmp_path_factory.mktemp("shm-transport")))
    stack.start()
    try:
        stack.wait_healthy(timeout=300)
        yield stack
    finally:
        stack.stop()


def _address(stack: Stack, name: str) -> str:
    return next(spec.address for spec in stack.specs if spec.name == name)


@pytest.fixture(scope="module")
async def decode(shm_stack: Stack) -> AsyncIterator[tuple[decode_pb2_grpc.DecodeServiceStub, common_pb2.ModelInfo]]:
    async with grpc.aio.insecure_channel(_address(shm_stack, "decode")) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        yield stub, await stub.GetModelInfo(common_pb2.ModelInfoRequest())


async def _admit(stub: decode_pb2_grpc.DecodeServiceStub, request_id: str, prompt: list[int],
                 max_tokens: int) -> tuple[grpc.aio.UnaryStreamCall, str]:
    """Admit the prompt; the call and the host identity the decode reported (Accepted.kv_shm_host)."""
    call = stub.Generate(decode_pb2.DecodeRequest(
        request_id=request_id, prompt_token_ids=prompt, kv_source=decode_pb2.KV_SOURCE_DIRECT,
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)), timeout=60)
    accepted = await call.read()
    return call, accepted.accepted.kv_shm_host


async def _prefill(stack: Stack, prefill: str, decode: str, request_id: str, prompt: list[int], decode_host: str,
                   attempt: int = 0) -> prefill_pb2.PrefillDone:
    async with grpc.aio.insecure_channel(_address(stack, prefill)) as channel:
        events = [event async for event in prefill_pb2_grpc.PrefillServiceStub(channel).Prefill(
            prefill_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt, transfer_attempt=attempt,
                                       decode_address=_address(stack, decode), decode_kv_shm_host=decode_host,
                                       sampling=common_pb2.SamplingParams(temperature=0)), timeout=60)]
    return events[-1].done


async def _idle(stub: decode_pb2_grpc.DecodeServiceStub) -> tuple[int, int]:
    for _ in range(50):  # blocks of a cancelled request return when its step ends
        stats = await stub.Stats(common_pb2.StatsRequest())
        if (stats.active_requests, stats.blocks_used) == (0, 0):
            break
        await asyncio.sleep(0.1)
    return stats.active_requests, stats.blocks_used


async def test_greedy_output_over_shm_equals_hugging_face(shm_stack, decode, tiny) -> None:
    stub, _ = decode
    prompt = [1, 450, 7483, 310, 3444, 338, 263, 4802]
    generation, decode_host = await _admit(stub, "exact-shm", prompt, max_tokens=8)
    assert decode_host == shm.host_identity()  # the decode accepts shm and says where it runs
    done = await _prefill(shm_stack, "prefill", "decode", "exact-shm", prompt, decode_host)
    assert done.kv_transport == "shm"  # auto picked shared memory: same host, the decode accepts it
    assert await read_tokens(generation) == tiny.reference_generate(prompt, 8)
    assert shm.segments_of(PREFIX) == []  # unlinked once the decode acknowledged


@pytest.mark.parametrize(("prompt_tokens", "decode_host", "token_chunks"), [
    (40, "this host", 1),  # through shm: one chunk per layer group (--kv-shm-chunk-tokens, 2048)
    (40, "", 3),  # inline (the decode offers no shm): 16-token chunks (--kv-chunk-tokens)
    (100, "this host", 7)])  # a chunked prefill (over --prefill-chunk-tokens, 64): 16-token chunks
async def test_a_transfer_through_shm_takes_larger_chunks_and_output_equals_hugging_face(
        shm_stack, decode, tiny, prompt_tokens: int, decode_host: str, token_chunks: int) -> None:
    stub, info = decode
    request_id = f"shm-chunks-{next(_ids)}"
    prompt = [(11 * i) % 4000 + 10 for i in range(prompt_tokens)]
    generation, host = await _admit(stub, request_id, prompt, max_tokens=4)
    done = await _prefill(shm_stack, "prefill", "decode", request_id, prompt, host if decode_host else "")
    assert done.kv_transport == ("shm" if decode_host else "grpc")
    layer_groups = 1 if prompt_tokens > 64 else info.num_layers  # --kv-chunk-layers 1 unless chunked
    assert done.chunk_count == token_chunks * layer_groups
    assert await read_tokens(generation) == tiny.reference_generate(prompt, 4)
    assert shm.segments_of(PREFIX) == []


async def test_through_the_gateway_auto_picks_shm_and_output_equals_hugging_face(shm_stack, tiny) -> None:
    """The gateway relays the decode's host identity from its admission to the prefill."""
    async with grpc.aio.insecure_channel(_address(shm_stack, "prefill")) as channel:
        prefill = prefill_pb2_grpc.PrefillServiceStub(channel)
        before = (await prefill.Stats(common_pb2.StatsRequest(), timeout=10)).shm_transfers_total
        async with GatewayClient(_address(shm_stack, "gateway")) as client:
            completion = await client.complete(TEXT, max_tokens=6, temperature=0, timeout=60)
        assert (await prefill.Stats(common_pb2.StatsRequest(), timeout=10)).shm_transfers_total == before + 1
    encoder = PromptEncoder(resolve_model_dir("tiny", default_cache_dir()))
    assert completion.token_ids == tiny.reference_generate(encoder.encode_text(TEXT), 6)


def test_auto_falls_back_to_grpc_and_forced_shm_needs_the_same_host() -> None:
    assert choose_transport("auto", "host-a", "host-a") == "shm"
    assert choose_transport("auto", "host-a", "host-b") == "grpc"
    assert choose_transport("auto", "host-a", "") == "grpc"  # a decode refusing shm reports no host
    assert choose_transport("grpc", "host-a", "host-a") == "grpc"
    for refusing in ("host-b", ""):
        with pytest.raises(TransportUnavailable):
            choose_transport("shm", "host-a", refusing)


# Each case turns a good shm transfer (its writer, its messages) into a bad one.
Mutation = Callable[[ShmTransferWriter, list[Message], ShmTransferWriter], list[Message]]


def _chunk0(messages: list[Message], **where: object) -> list[Message]:
    chunk = messages[1]
    assert isinstance(chunk, KvChunk) and chunk.shm is not None
    return [messages[0], dataclasses.replace(chunk, shm=dataclasses.replace(chunk.shm, **where)), *messages[2:]]


def _layout(messages: list[Message], segment: str) -> list[Message]:
    assert isinstance(messages[0], KvLayout)
    return [dataclasses.replace(messages[0], shm_segment=segment), *messages[1:]]




CASES: list[tuple[str, Mutation, grpc.StatusCode, str]] = [
    ("missing-segment", lambda w, m, o: _layout(m, shm.new_segment_name("test-gone")),
     grpc.StatusCode.NOT_FOUND, "does not exist"),
    ("not-a-project-segment", lambda w, m, o: _layout(m, "../../etc/passwd"),
     grpc.StatusCode.INVALID_ARGUMENT, "not a shared-memory segment name"),
    ("offset-outside", lambda w, m, o: _chunk0(m, offset=10**9), grpc.StatusCode.INVALID_ARGUMENT, "outside"),
    ("offset-in-header", lambda w, m, o: _chunk0(m, offset=0), grpc.StatusCode.INVALID_ARGUMENT, "outside"),
    ("length-outside", lambda w, m, o: _chunk0(m, length=10**9), grpc.StatusCode.INVALID_ARGUMENT, "outside"),
    ("checksum", lambda w, m, o: m, grpc.StatusCode.DATA_LOSS, "crc"),  # its segment bytes are corrupted
    ("slice-of-another-requests-segment", lambda w, m, o: _chunk0(m, segment=o.name),
     grpc.StatusCode.INVALID_ARGUMENT, "names segment"),
    ("layout-names-another-requests-segment", lambda w, m, o: _layout(m, o.name),
     grpc.StatusCode.INVALID_ARGUMENT, "does not hold request"),
]


def _shm_transfer(model: common_pb2.ModelInfo, request_id: str,
                  corrupt: bool = False) -> tuple[ShmTransferWriter, list[Message]]:
    """A well-formed transfer whose chunk bytes lie in a segment this test created (as a prefill);
    `corrupt`: the first chunk's bytes in the segment do not match its checksum."""
    messages = real_transfer(model, request_id, NUM_TOKENS, chunk_tokens=2, chunk_layers=2)
    layout, first = messages[0], messages[1]
    assert isinstance(layout, KvLayout) and isinstance(first, KvChunk)
    if corrupt:
        messages[1] = dataclasses.replace(first, data=bytes([first.data[0] ^ 1]) + first.data[1:])
    writer = ShmTransferWriter.create(SENDER_PREFIX, layout)
    chunks = [writer.put(m) if isinstance(m, KvChunk) else m for m in messages[1:]]
    return writer, [dataclasses.replace(layout, shm_segment=writer.name), *chunks]


async def _unmapped(stack: Stack, process: str, *segments: str) -> bool:
    """Whether `process` maps none of `segments` (its mapping of a transfer's segment is closed in
    a worker thread once the call ended: waited for up to 10 s)."""
    pid = stack.processes[process].pid
    for _ in range(100):
        if not any(name in text for text in _mappings_and_files(pid) for name in segments):
            return True
        await asyncio.sleep(0.1)
    return False


def _mappings_and_files(pid: int) -> list[str]:
    """What process `pid` maps and which files it holds open (an open descriptor of an unlinked
    segment would keep its pages allocated)."""
    files = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            files.append(os.readlink(fd))
        except OSError:  # closed meanwhile
            pass
    return [Path(f"/proc/{pid}/maps").read_text(), *files]


@pytest.mark.parametrize(("name", "mutate", "code", "phrase"), CASES, ids=[c[0] for c in CASES])
async def test_bad_shm_slice_gets_clear_status_and_nothing_is_held(shm_stack, decode, name, mutate, code,
                                                                   phrase) -> None:
    stub, model = decode
    request_id = f"bad-{name}-{next(_ids)}"
    writer, messages = _shm_transfer(model, request_id, corrupt=name == "checksum")
    other, _ = _shm_transfer(model, f"other-{request_id}")
    try:
        generation = await admit(stub, request_id, NUM_TOKENS)
        with pytest.raises(grpc.aio.AioRpcError) as sent:
            await send(stub, mutate(writer, messages, other))
        assert sent.value.code() == code
        assert phrase.lower() in sent.value.details().lower()
        with pytest.raises(grpc.aio.AioRpcError) as generated:  # the request fails with the same status
            await generation.read()
        assert generated.value.code() == code
        assert await _unmapped(shm_stack, "decode", writer.name, other.name)
    finally:
        writer.destroy()
        other.destroy()
    assert await _idle(stub) == (0, 0)
    assert shm.segments_of(SENDER_PREFIX) == []


async def test_a_corrupt_chunk_fails_the_transfer_before_a_later_chunks_bad_slice(shm_stack, decode) -> None:
    """Chunks are verified in a worker thread while later ones are parsed: the first chunk's
    failure is still the transfer's, not the later message's own fault."""
    stub, model = decode
    request_id = f"order-{next(_ids)}"
    writer, messages = _shm_transfer(model, request_id, corrupt=True)
    second = messages[2]
    assert isinstance(second, KvChunk) and second.shm is not None
    messages[2] = dataclasses.replace(second, shm=dataclasses.replace(second.shm, offset=10**9))
    try:
        generation = await admit(stub, request_id, NUM_TOKENS)
        with pytest.raises(grpc.aio.AioRpcError) as sent:
            await send(stub, messages)
        assert sent.value.code() == grpc.StatusCode.DATA_LOSS
        assert "kv chunk 0 fails its crc-32c check" in sent.value.details().lower()
        with pytest.raises(grpc.aio.AioRpcError):
            await generation.read()
    finally:
        writer.destroy()
    assert await _idle(stub) == (0, 0)


async def test_handcrafted_shm_transfer_is_decoded_and_the_decode_unmaps_it(shm_stack, decode) -> None:
    stub, model = decode
    writer, messages = _shm_transfer(model, f"good-{next(_ids)}")
    try:
        generation = await admit(stub, messages[0].request_id, NUM_TOKENS, max_tokens=2)
        assert (await send(stub, messages)).chunks_received == len(messages) - 2
        assert (await read_tokens(generation))[0] == 42  # the transfer's first token
        assert await _unmapped(shm_stack, "decode", writer.name)  # no mapping left behind per transfer
    finally:
        writer.destroy()


@pytest.mark.skipif(tuple(map(int, os.uname().release.split(".")[:2])) < (5, 14), reason="MADV_POPULATE_READ")
def test_map_for_reading_maps_every_page_of_an_attached_segment() -> None:
    size = 1 << 20
    name = shm.write_segment(SENDER_PREFIX, bytes(size))  # written through its file: mapped by no one
    try:
        reader = shm.attach(name)
        try:
            assert _resident_kb(name) == 0
            shm.map_for_reading(reader)
            assert _resident_kb(name) == size // 1024
        finally:
            shm.close(reader)
    finally:
        shm.unlink(name)


async def test_the_receiver_unmaps_only_once_its_readers_are_done() -> None:
    """A reader of a chunk's bytes (the thread that verifies and stores them, which may go on after
    the transfer was cancelled) keeps the segment mapped; once it is done the segment is unmapped
    and the chunk's view released, whoever still holds it."""
    layout = KvLayout("readers", "fp", 1, 1, 4, 2, 2, 1, "float32")
    ones = torch.ones(1, 1, 2, 4)
    writer = ShmTransferWriter.create(SENDER_PREFIX, layout)
    try:
        receiver = ShmReceiver(dataclasses.replace(layout, shm_segment=writer.name), accept_shm=True)
        receiver.map_ahead()
        chunk = receiver.resolve(writer.put(encode_chunk(layout, 0, ones, ones)))
        assert isinstance(chunk, KvChunk) and _mappings_of(writer.name) == 2  # the writer's and the receiver's
        reading: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        receiver.add_reader(reading)
        receiver.release()
        await asyncio.sleep(0.3)
        assert bytes(chunk.data[:4]) == struct.pack("<f", 1.0)  # still mapped while the reader reads
        reading.set_result(None)
        for _ in range(50):
            await asyncio.sleep(0.1)
            if _mappings_of(writer.name) == 1:
                break
        assert _mappings_of(writer.name) == 1  # the receiver's is gone
        with pytest.raises(ValueError):  # its view released: no read of an unmapped page is possible
            bytes(chunk.data[:4])
    finally:
        writer.destroy()


def _mappings_of(name: str) -> int:
    return sum(line.endswith(f"/{name}") for line in Path("/proc/self/maps").read_text().splitlines())


def _resident_kb(name: str) -> int:
    """Resident kB of this process's mappings of segment `name`, from /proc/self/smaps."""
    resident, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef" and "-" in line.split(" ", 1)[0]:
            inside = line.rstrip().endswith(f"/{name}")
        elif inside and line.startswith("Rss:"):
            resident += int(line.split()[1])
    return resident


def test_a_decode_refusing_shm_refuses_a_layout_naming_a_segment() -> None:
    layout = KvLayout("refused", "fp", 1, 1, 1, 1, 1, 1, "float32", shm_segment=shm.new_segment_name("test-x"))
    with pytest.raises(TransportUnavailable):
        ShmReceiver(layout, accept_shm=False)


async def test_reaper_unlinks_a_dead_creators_segment_at_start() -> None:
    prefix = f"test-reap-{uuid.uuid4().hex[:6]}"
    owner = shm.owner_of(shm.new_segment_name(prefix))
    assert owner is not None
    dead = f"{prefix}.{owner.pid_namespace}.{2**22 + 1}.1.{'d' * 16}"  # above the largest pid_max: no such process
    (shm.SHM_DIR / dead).write_bytes(b"x")
    reaper = ShmReaper(prefix, interval_seconds=3600)
    reaper.start()
    await reaper.stop()
    assert shm.segments_of(prefix) == [] and reaper.reaped_total == 1


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state_and_parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if int(state_and_parent[1]) == pid:
            found.append(int(stat.parent.name))
    return found


async def _when_segment_appears(timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not shm.segments_of(PREFIX):
        assert time.monotonic() < deadline, "no shm transfer started"
        await asyncio.sleep(0.001)


async def _segments_gone(seconds: float = 10) -> list[str]:
    for _ in range(int(seconds / 0.05)):
        if not (left := shm.segments_of(PREFIX)):
            return left
        await asyncio.sleep(0.05)
    return left


async def test_prefill_killed_mid_shm_transfer_is_reaped_and_the_request_retried(shm_stack, decode, tiny) -> None:
    stub, _ = decode
    generation, host = await _admit(stub, "kill-prefill", LONG_PROMPT, max_tokens=4)
    transfer = asyncio.ensure_future(_prefill(shm_stack, "prefill_victim", "decode", "kill-prefill", LONG_PROMPT,
                                              host))
    await _when_segment_appears()
    victim = shm_stack.processes["prefill_victim"]
    victim.send_signal(signal.SIGSTOP)  # frozen mid-transfer: the decode still waits for the KV
    assert (await stub.Stats(common_pb2.StatsRequest())).awaiting_kv == 1
    for child in _children(victim.pid):  # its resource tracker too, as an OOM kill of its container does:
        os.kill(child, signal.SIGKILL)  # only the reaper is left to unlink the segment
    victim.kill()
    victim.wait(timeout=30)
    with pytest.raises(grpc.aio.AioRpcError):
        await transfer
    assert await _segments_gone() == []  # the live prefill's reaper (same prefix) unlinked it
    done = await _prefill(shm_stack, "prefill", "decode", "kill-prefill", LONG_PROMPT, host, attempt=1)  # retry
    assert done.kv_transport == "shm"
    assert await read_tokens(generation) == tiny.reference_generate(LONG_PROMPT, 4)
    assert await _idle(stub) == (0, 0)


async def test_decode_killed_mid_shm_transfer_fails_clearly_and_the_segment_goes(shm_stack) -> None:
    async with grpc.aio.insecure_channel(_address(shm_stack, "decode_victim")) as channel:
        victim = decode_pb2_grpc.DecodeServiceStub(channel)
        generation, host = await _admit(victim, "kill-decode", LONG_PROMPT, max_tokens=4)
        transfer = asyncio.ensure_future(_prefill(shm_stack, "prefill", "decode_victim", "kill-decode", LONG_PROMPT,
                                                  host))
        await _when_segment_appears()
        shm_stack.processes["decode_victim"].kill()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await transfer
        generation.cancel()
    # The decode's fault, named so (a send that fails as the connection drops reads INTERNAL in grpc.aio)
    assert fault_role(failed.value) == "decode"
    assert failed.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)
    assert await _segments_gone() == []  # the prefill unlinked its segment when the transfer failed
    async with grpc.aio.insecure_channel(_address(shm_stack, "prefill")) as channel:
        stats = await prefill_pb2_grpc.PrefillServiceStub(channel).Stats(common_pb2.StatsRequest(), timeout=10)
    assert (stats.active_requests, stats.kv_bytes_held) == (0, 0)
