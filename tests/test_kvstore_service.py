"""The kvstore contract through the real gRPC service of each backend (one kvstore process per
backend): a reader on the kvstore's host gets an shm value as a segment descriptor and reads
/dev/shm, any other reader gets the bytes; a descriptor of a value that went reads as NOT_FOUND,
never as other bytes. And the shm segment lifecycle across processes: the reaper's timer, kill -9
and restart."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from services.bench.kvstore_get import measure, table
from services.common import shm
from services.common.channel_factory import ChannelFactory
from services.common.errors import KvCorrupted, UnknownRequest
from services.common.kvstore_client import KvStoreClient, read_shared
from services.common.pb import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from services.kvstore.backend import BACKEND_NAMES, BackendSettings, make_backend
from services.stack import ServiceSpec, Stack, free_port
from tests.conftest import start_healthy


@dataclass
class Kvstores:
    stack: Stack
    prefix: str  # of the shm kvstore's segments

    def __getitem__(self, name: str) -> str:
        return next(spec.address for spec in self.stack.specs if spec.name == name)


@pytest.fixture(scope="module")
def kvstores(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Kvstores]:
    """One kvstore process per backend (no model), by backend name."""
    prefix = f"kv-test-{uuid.uuid4().hex[:8]}"
    specs = []
    for name in BACKEND_NAMES:
        port = free_port()
        specs.append(ServiceSpec(name, "kvstore", port, (
            "--port", str(port), "--metrics-port", "0", "--backend", name, "--redis-url", redis_url,
            "--redis-key-prefix", prefix, "--shm-prefix", prefix)))
    log_dir = tmp_path_factory.mktemp("kvstores")
    stack = Stack(specs, log_dir=str(log_dir))
    start_healthy(stack, Path(log_dir))
    yield Kvstores(stack, prefix)
    stack.stop()
    assert shm.segments_of(prefix) == []  # the shm kvstore unlinked every segment at shutdown


@pytest.mark.parametrize("name", BACKEND_NAMES)
async def test_service_contract_and_read_paths(kvstores: Kvstores, name: str) -> None:
    namespace, value = f"api-test-{uuid.uuid4().hex[:6]}", os.urandom(200_000)
    local = kvstore_pb2.GetRequest(namespace=namespace, key="k/1", host_identity=shm.host_identity())
    async with grpc.aio.insecure_channel(kvstores[name]) as channel:
        stub = kvstore_pb2_grpc.KvStoreServiceStub(channel)
        await stub.Put(kvstore_pb2.PutRequest(namespace=namespace, key="k/1", value=value, ttl_seconds=30))
        for remote in ("", "another-host"):  # a reader that does not ask, or on another host: bytes
            reply = await stub.Get(kvstore_pb2.GetRequest(namespace=namespace, key="k/1", host_identity=remote))
            assert reply.value == value and not reply.HasField("shm")
        reply = await stub.Get(local)
        assert reply.HasField("shm") == (name == "shm")
        if name == "shm":
            assert reply.value == b"" and reply.shm.length == len(value)
            assert shm.read_segment(reply.shm.segment, reply.shm.length) == value
        for shared_memory_reads in (True, False):  # either way the client returns the bytes
            client = KvStoreClient(kvstores[name], namespace, 10.0, ChannelFactory(), shared_memory_reads)
            assert await client.get("k/1") == value
            await client.close()
        assert (await stub.Delete(kvstore_pb2.DeleteRequest(namespace=namespace, prefix="k/"))).deleted == 1
        for request in (local, kvstore_pb2.GetRequest(namespace=namespace, key="k/1")):
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.Get(request)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        for bad in (kvstore_pb2.PutRequest(namespace=namespace, key="", value=b"v"),
                    kvstore_pb2.PutRequest(namespace="", key="k", value=b"v"),
                    kvstore_pb2.PutRequest(namespace=namespace, key="has space", value=b"v")):
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await stub.Put(bad)
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stats = await stub.Stats(common_pb2.StatsRequest())
    assert stats.backend == name
    assert (stats.shm_gets_total > 0) == (name == "shm")


async def test_a_descriptor_read_after_the_value_went_is_not_found_never_other_bytes(kvstores: Kvstores) -> None:
    namespace = f"api-test-{uuid.uuid4().hex[:6]}"
    async with grpc.aio.insecure_channel(kvstores["shm"]) as channel:
        stub = kvstore_pb2_grpc.KvStoreServiceStub(channel)
        await stub.Put(kvstore_pb2.PutRequest(namespace=namespace, key="gone", value=b"g" * 1000))
        gone = (await stub.Get(kvstore_pb2.GetRequest(namespace=namespace, key="gone",
                                                      host_identity=shm.host_identity()))).shm
        assert await read_shared(gone, "gone") == b"g" * 1000
        await stub.Put(kvstore_pb2.PutRequest(namespace=namespace, key="gone", value=b"n" * 1000))  # replaced
        with pytest.raises(UnknownRequest):
            await read_shared(gone, "gone")
        now = (await stub.Get(kvstore_pb2.GetRequest(namespace=namespace, key="gone",
                                                     host_identity=shm.host_identity()))).shm
        assert now.segment != gone.segment and await read_shared(now, "gone") == b"n" * 1000
        for bad in (kvstore_pb2.ShmValue(segment=now.segment, length=999),  # not the segment's size
                    kvstore_pb2.ShmValue(segment="../../etc/passwd", length=10)):
            with pytest.raises(KvCorrupted):
                await read_shared(bad, "gone")
        await stub.Delete(kvstore_pb2.DeleteRequest(namespace=namespace, keys=["gone"]))
        with pytest.raises(UnknownRequest):
            await read_shared(now, "gone")


_WRITE_AND_WAIT = """
import sys, time
from services.bench.kvstore_get import measure, table
from services.common import shm
print(shm.write_segment(sys.argv[1], b"orphan"), flush=True)
time.sleep(60)
"""


_FILL_A_SMALL_DEV_SHM = """
import asyncio, json
from services.common import shm
from services.common.errors import BackendUnavailable
from services.kvstore.shm_backend import ShmBackend

async def main():
    store = ShmBackend(10_000_000, "kv-test-full", 60)  # a budget far above the 64 KiB /dev/shm
    await store.put("n", "first", b"f" * 40_000, 60)
    try:
        await store.put("n", "second", b"s" * 40_000, 60)
        refused = ""
    except BackendUnavailable as error:
        refused = str(error)
    held = (shm.segments_of("kv-test-full"), (await store.stats()).entries, await store.get("n", "first"))
    await store.close()
    print(json.dumps({"refused": refused, "segments": len(held[0]), "entries": held[1],
                      "first_intact": held[2] == b"f" * 40_000, "after_close": shm.segments_of("kv-test-full")}))

asyncio.run(main())
"""


def test_a_full_dev_shm_refuses_a_put_with_unavailable_and_keeps_what_it_holds() -> None:
    """In a private mount namespace whose /dev/shm is a 64 KiB tmpfs (needs root: skipped without;
    the same error path is covered everywhere by test_kvstore.py's refused writes)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not on PATH: a private /dev/shm mount needs it")
    mount_then_run = 'mount -t tmpfs -o size=64k tmpfs /dev/shm || exit 99; exec "$0" -c "$1"'
    run = subprocess.run(["unshare", "--mount", "sh", "-c", mount_then_run, sys.executable, _FILL_A_SMALL_DEV_SHM],
                         capture_output=True, text=True, timeout=120, check=False,
                         cwd=Path(__file__).resolve().parent.parent)
    if run.returncode == 99 or "unshare failed" in run.stderr or "Operation not permitted" in run.stderr:
        pytest.skip(f"no private /dev/shm here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert "No space left on device" in result["refused"]
    assert (result["segments"], result["entries"], result["first_intact"]) == (1, 1, True)
    assert result["after_close"] == []


def _segment_writer(prefix: str) -> tuple[subprocess.Popen[str], str]:
    """A process that wrote one segment of `prefix` and waits; and the segment's name."""
    writer = subprocess.Popen([sys.executable, "-c", _WRITE_AND_WAIT, prefix], stdout=subprocess.PIPE, text=True)
    return writer, writer.stdout.readline().strip() if writer.stdout else ""


async def test_shm_reaper_timer_unlinks_expired_values_and_segments_of_dead_kvstores() -> None:
    prefix = f"kv-test-{uuid.uuid4().hex[:8]}"
    dead, orphan = _segment_writer(prefix)
    store = make_backend("shm", BackendSettings(byte_budget=1000, redis_url="", redis_key_prefix="",
                                                redis_part_bytes=1, shm_prefix=prefix, shm_reap_seconds=0.2))
    try:
        assert orphan in shm.segments_of(prefix)  # its creator still runs: not reaped at start
        await store.put("ns", "brief", b"b" * 10, 0.1)
        await store.put("ns", "kept", b"k" * 10, 60)
        dead.kill()
        dead.wait(timeout=30)
        await asyncio.sleep(0.8)  # no call meanwhile: the timer alone expires and reaps
        kept = await store.locate("ns", "kept")
        assert kept is not None and shm.segments_of(prefix) == [kept.segment]
    finally:
        dead.kill()
        await store.close()
    assert shm.segments_of(prefix) == []


async def test_get_benchmark_reports_each_read_path(kvstores: Kvstores) -> None:
    figures = await measure({"memory": kvstores["memory"], "shm": kvstores["shm"]}, 100_000, 3)
    assert [f.path for f in figures] == ["memory backend, gRPC bytes", "shm backend, gRPC bytes",
                                         "shm backend, descriptor"]
    assert all(f.median_ms > 0 and f.gb_per_s > 0 for f in figures)
    assert "descriptor" in table(figures, 100_000)


def test_kill_9_of_an_shm_kvstore_leaves_no_segment_after_its_restart(kvstores: Kvstores) -> None:
    """Last of the module: it kills and restarts the module's shm kvstore."""
    stack, prefix = kvstores.stack, kvstores.prefix
    with grpc.insecure_channel(kvstores["shm"]) as channel:
        stub = kvstore_pb2_grpc.KvStoreServiceStub(channel)
        for index in range(3):
            stub.Put(kvstore_pb2.PutRequest(namespace="n", key=f"k{index}", value=b"v" * 5000), timeout=10)
    left = shm.segments_of(prefix)
    assert len(left) == 3
    stack.processes["shm"].kill()  # SIGKILL: no shutdown, nothing unlinked
    stack.processes["shm"].wait(timeout=30)
    assert shm.segments_of(prefix) == left
    spec = next(spec for spec in stack.specs if spec.name == "shm")
    stack.start_one(spec)
    restarted = Stack([spec])
    restarted.processes = stack.processes
    restarted.wait_healthy(timeout=60)  # its reaper ran at start, before it served
    assert shm.segments_of(prefix) == []
    with grpc.insecure_channel(kvstores["shm"]) as channel, pytest.raises(grpc.RpcError) as missing:
        kvstore_pb2_grpc.KvStoreServiceStub(channel).Get(kvstore_pb2.GetRequest(namespace="n", key="k0"),
                                                         timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
