"""Review findings against the decode hardening (everything since 0da756e): each test proves one
defect and FAILS on the code it was written against. Tiny random-weight model; in-process engine
harnesses where they suffice, real processes otherwise. Every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.client import GatewayClient, GatewayError, RetryPolicy
from services.common.errors import ServiceError
from services.common.pb import (common_pb2, decode_pb2, decode_pb2_grpc, gateway_pb2_grpc, kvstore_pb2_grpc,
                                prefill_pb2, prefill_pb2_grpc)
from services.common.runtime import ModelRuntime
from services.stack import ServiceSpec, free_port
from tests.conftest import RunningStack, start_stack
from tests.engine_harness import PROMPT, Harness, started
from tests.held import decode_stats
from tests.kv_helpers import real_transfer, send

_ids = itertools.count()


@pytest.fixture
async def small_batch(tiny: ModelRuntime) -> AsyncIterator[Harness]:
    """8 blocks of 16 tokens, one sequence per step (--max-batch-size 1)."""
    async with started(tiny, blocks=8, batch=1) as running:
        yield running


# ---------------------------------------------------------------------------------------------
# 1. Scheduler deadlock: with the batch full (--max-batch-size 1), an OLDER sequence that is READY
#    holds its blocks but can never join, while the lone running NEWER sequence cannot grow: it
#    finds no newer victim, will not preempt itself (it is alone in `_running`), and sits out
#    every step. Nothing ever wakes the loop again: both requests hang forever, silently.
async def test_older_ready_sequence_and_lone_running_one_never_deadlock_when_the_batch_is_full(
        small_batch: Harness, tiny: ModelRuntime) -> None:
    engine = small_batch.engine
    older = small_batch.admit("older", list(range(1, 65)), max_tokens=4)  # 4 of the 8 blocks
    newer = small_batch.admit("newer", PROMPT, max_tokens=100)  # peaks at 105 tokens: fits the pool alone
    engine.prefill_locally(newer)  # its KV arrives first: it runs (the batch of one is full)
    engine.prefill_locally(older)  # ready behind it, holding 4 blocks; the newer one stops at 64 tokens
    try:
        newer_tokens, older_tokens = await asyncio.wait_for(
            asyncio.gather(small_batch.tokens(newer), small_batch.tokens(older)), 20)
    except TimeoutError:
        states = (newer.state.value, len(newer.generated), older.state.value, engine.blocks.used)
        pytest.fail(f"hung: newer {states[0]} after {states[1]} tokens, older {states[2]}, blocks used {states[3]}")
    assert newer_tokens == tiny.reference_generate(PROMPT, 100)
    assert len(older_tokens) == 4


# ---------------------------------------------------------------------------------------------
# 5. INTERNAL where a clear status is due (DecodeService contract: a second admission of an id
#    gets ALREADY_EXISTS): a request released while its sequence is in a decode step keeps its
#    blocks until the step ends (scheduler._in_step); admitting the same id meanwhile passes
#    Admission.check (the id is no longer live) and BlockManager.allocate raises a bare ValueError
#    ("already holds blocks"), which the edge turns into INTERNAL. (Through the gateway this needs a
#    failover back to the same worker within its failure backoff, so mostly direct callers see it.)
async def test_readmitting_an_id_released_during_its_step_gets_a_clear_status(harness: Harness) -> None:
    engine, entered, gate = harness.engine, threading.Event(), threading.Event()
    real_step = engine._runner.step

    def slow_step(slots: list) -> torch.Tensor:
        entered.set()
        gate.wait(20)
        return real_step(slots)

    engine._runner.step = slow_step
    first = harness.admit("same-id", PROMPT, max_tokens=8)
    engine.prefill_locally(first)
    try:
        assert await asyncio.to_thread(entered.wait, 20)
        engine.release(first)  # the gateway lost its stream to this worker during the step
        try:
            again = harness.admit("same-id", PROMPT, max_tokens=8)  # failover: same internal id, same worker
        except ServiceError:
            pass  # a status the gateway understands (ALREADY_EXISTS, RESOURCE_EXHAUSTED)
        except Exception as error:  # noqa: BLE001
            pytest.fail(f"re-admission raised {type(error).__name__}: {error} (the edge turns it into INTERNAL)")
        else:
            engine.release(again)
    finally:
        gate.set()


# ---------------------------------------------------------------------------------------------
# Real processes: kvstore (memory), prefill, decode (KV timeout 2 s), gateway; tests add more.
@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running = start_stack(tmp_path_factory.mktemp("review"), "tiny",
                          extra={"decode": ("--kv-timeout-seconds", "2")})
    try:
        yield running
    finally:
        running.stack.stop()


async def kvstore_entries(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        return (await kvstore_pb2_grpc.KvStoreServiceStub(channel).Stats(common_pb2.StatsRequest(),
                                                                          timeout=10)).entries


async def eventually(probe, expected, seconds: float = 8.0):  # type: ignore[no-untyped-def]
    """The probe's value once it equals `expected`, or its last value after `seconds`."""
    value = None
    for _ in range(int(seconds / 0.1)):
        value = await probe()
        if value == expected:
            return value
        await asyncio.sleep(0.1)
    return value


# 2. kvstore keys leak: with --kv-transfer kvstore the decode owns the stored KV "from admission on"
#    and deletes `kv/<id>/` once, when its request ends (engine.release -> _forget). A prefill that
#    is still working then (queued longer than the decode's --kv-timeout-seconds, or a client
#    cancel that reaches the decode first) goes on writing layout, chunks and end into the
#    kvstore; its KvStoreSink is `_closed` once the end is written, so when the decode then refuses
#    the announcement (NOT_FOUND) the prefill's abort() deletes nothing. Nobody ever deletes them.
async def test_kv_a_prefill_stores_after_the_decode_request_ended_is_not_left_in_the_kvstore(stack) -> None:
    assert await eventually(lambda: kvstore_entries(stack["kvstore"]), 0) == 0
    request_id, prompt = f"late-store-{next(_ids)}", PROMPT * 3
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=4)
    async with grpc.aio.insecure_channel(stack["decode"]) as decode_channel, \
            grpc.aio.insecure_channel(stack["prefill"]) as prefill_channel:
        generation = decode_pb2_grpc.DecodeServiceStub(decode_channel).Generate(decode_pb2.DecodeRequest(
            request_id=request_id, prompt_token_ids=prompt, sampling=sampling,
            kv_source=decode_pb2.KV_SOURCE_KVSTORE), timeout=30)
        assert (await generation.read()).HasField("accepted")
        with pytest.raises(grpc.aio.AioRpcError) as expired:  # the prefill queue was longer than the KV timeout
            await generation.read()
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (await eventually(lambda: decode_stats(stack["decode"]), None, 0.3)).active_requests == 0
        # ... and now the (gateway's) prefill call for that admission runs, as it would
        prefill = prefill_pb2_grpc.PrefillServiceStub(prefill_channel).Prefill(prefill_pb2.PrefillRequest(
            request_id=request_id, prompt_token_ids=prompt, sampling=sampling, decode_address=stack["decode"],
            store_kv=True), timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in prefill:
                pass
        assert refused.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED)
    left = await eventually(lambda: kvstore_entries(stack["kvstore"]), 0)
    assert left == 0, f"{left} kvstore entries of the ended request {request_id!r} were never deleted"


# 3. A prefill worker that fails (dies, loses its connection, runs out its deadline) AFTER the
#    decode acknowledged its KV is taken for a prefill fault and retried with transfer_attempt + 1;
#    the decode refuses the retry (the request no longer awaits KV: NOT_FOUND, marked as the
#    decode's fault), and the gateway ends the whole request with NOT_FOUND although the decode
#    holds the complete KV and is generating (prefill_route.events / core._prefill).
class _DeliverThenDie(prefill_pb2_grpc.PrefillServiceServicer):
    """Attempt 0: hands the request's KV to the decode worker (acknowledged), streams the first
    token, then fails UNAVAILABLE as a worker that died at that moment would. Later attempts are
    relayed to a real prefill worker."""

    def __init__(self, model: common_pb2.ModelInfo, real_prefill: str) -> None:
        self._model = model
        self._real = real_prefill
        self.calls: list[int] = []

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        self.calls.append(request.transfer_attempt)
        if request.transfer_attempt == 0:
            async with grpc.aio.insecure_channel(request.decode_address) as channel:
                await send(decode_pb2_grpc.DecodeServiceStub(channel), real_transfer(
                    self._model, request.request_id, len(request.prompt_token_ids), 4, 2, first_token=9))
            yield prefill_pb2.PrefillEvent(first_token=prefill_pb2.FirstToken(token_id=9))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker died after the handoff")
        async for event in _relay(self._real, request, context):
            yield event


async def _relay(real_prefill: str, request: prefill_pb2.PrefillRequest,
                 context: grpc.aio.ServicerContext) -> AsyncIterator[prefill_pb2.PrefillEvent]:
    """Pass a Prefill call on to the real prefill worker, its events and its failure alike."""
    async with grpc.aio.insecure_channel(real_prefill) as channel:
        call = prefill_pb2_grpc.PrefillServiceStub(channel).Prefill(request, timeout=30)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as error:
            context.set_trailing_metadata(await call.trailing_metadata())
            await context.abort(error.code(), error.details())


async def _fake_prefill(servicer: object) -> tuple[grpc.aio.Server, str]:
    """An in-process worker (prefill or decode servicer) that reports SERVING."""
    server = grpc.aio.server()
    if isinstance(servicer, decode_pb2_grpc.DecodeServiceServicer):
        decode_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, server)
    else:
        prefill_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, f"127.0.0.1:{port}"


async def _wait_gateway_serving(address: str, seconds: float = 120) -> None:
    """Without blocking the event loop (the fake workers live on it)."""
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, "gateway never turned SERVING"
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def gateway_with_prefills(stack: RunningStack, servicers: list[object], *args: str,
                                role: str = "prefill") -> AsyncIterator[str]:
    """A gateway process in front of the stack's workers, with in-process servicers as its
    `role` workers (for decode: the fakes first, then the stack's real decode worker)."""
    servers = [await _fake_prefill(servicer) for servicer in servicers]
    addresses = [address for _, address in servers] + ([stack["decode"]] if role == "decode" else [])
    port = free_port()
    base = next(spec for spec in stack.stack.specs if spec.name == "gateway")
    spec = ServiceSpec(f"gateway_fake_{port}", "gateway", port, (
        *base.args, "--port", str(port), "--http-port", "0", "--metrics-port", "0",
        f"--{role}-addresses", ",".join(addresses), *args), base.env)
    stack.stack.specs.append(spec)
    process = stack.stack.start_one(spec)
    try:
        await _wait_gateway_serving(spec.address)
        yield spec.address
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 15)
        for server, _ in servers:
            await server.stop(0)


async def model_info(address: str) -> common_pb2.ModelInfo:
    async with grpc.aio.insecure_channel(address) as channel:
        return await decode_pb2_grpc.DecodeServiceStub(channel).GetModelInfo(common_pb2.ModelInfoRequest(),
                                                                              timeout=10)


async def test_prefill_that_fails_after_the_decode_took_its_kv_does_not_kill_the_request(stack) -> None:
    fakes = [_DeliverThenDie(await model_info(stack["decode"]), stack["prefill"]) for _ in range(2)]
    async with gateway_with_prefills(stack, fakes) as gateway:
        async with GatewayClient(gateway, retry=RetryPolicy(max_retries=0)) as client:
            result = await client.complete("Hello there", max_tokens=24, temperature=0, ignore_eos=True,
                                           timeout=60)
    assert len(result.token_ids) == 24
    assert sorted(call for fake in fakes for call in fake.calls) == [0, 1]
    assert (await eventually(lambda: decode_stats(stack["decode"]), None, 0.3)).active_requests == 0


# 4. Wrong status: a request whose decode admission ran out its KV timeout (the prefill was slower)
#    should fail DEADLINE_EXCEEDED (README, Failure handling). The gateway does not look at the
#    decode call while the prefill runs, and when the prefill finally reports the decode's refusal
#    (NOT_FOUND: "no request ... is waiting for KV", marked as the decode's fault) core._prefill
#    re-raises THAT: the client gets NOT_FOUND (or CANCELLED, if the layout arrived in time).
class _SlowPrefill(prefill_pb2_grpc.PrefillServiceServicer):
    """A prefill worker whose queue is longer than the decode's KV timeout: relays to a real one late."""

    def __init__(self, real_prefill: str, delay: float) -> None:
        self._real = real_prefill
        self._delay = delay

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        await asyncio.sleep(self._delay)
        async for event in _relay(self._real, request, context):
            yield event


async def test_kv_timeout_on_the_decode_reaches_the_client_as_deadline_exceeded(stack) -> None:
    async with gateway_with_prefills(stack, [_SlowPrefill(stack["prefill"], 3.0)]) as gateway:
        async with GatewayClient(gateway, retry=RetryPolicy(max_retries=0)) as client:
            with pytest.raises(GatewayError) as caught:
                await client.complete("Hello there", max_tokens=8, temperature=0, timeout=60)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value


# 6. Wrong tokens on failover: a decode stream that breaks (UNAVAILABLE) after its LAST token but
#    before its Finished event is failed over (core.generate) although nothing is left to do: the
#    new worker is admitted with position_offset == max_tokens, the prefill (here: the decode's
#    local prefill) samples one more token, the gateway streams it, and only then does the decode
#    say FINISH_LENGTH: the client gets max_tokens + 1 tokens. Had the last token been EOS, the
#    request would go on generating past the end of sequence.
class _DiesBeforeFinished(decode_pb2_grpc.DecodeServiceServicer):
    """Streams exactly the tokens the model would produce, all of them, then drops the stream."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self._runtime = runtime
        self.calls = 0

    async def Generate(self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        self.calls += 1
        yield decode_pb2.DecodeEvent(accepted=decode_pb2.Accepted())
        tokens = self._runtime.reference_generate(list(request.prompt_token_ids), request.sampling.max_tokens)
        for index, token in enumerate(tokens):
            yield decode_pb2.DecodeEvent(token=decode_pb2.DecodeToken(token_id=token, index=index))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset before the finish event")


async def test_failover_after_the_last_token_never_adds_a_token(stack, tiny: ModelRuntime) -> None:
    fake = _DiesBeforeFinished(tiny)
    async with gateway_with_prefills(stack, [fake], "--prefill-mode", "unified", role="decode") as gateway:
        async with GatewayClient(gateway, retry=RetryPolicy(max_retries=0)) as client:
            result = await client.complete("Hello there", max_tokens=6, temperature=0, ignore_eos=True, timeout=60)
    assert fake.calls == 1
    assert len(result.token_ids) == 6, f"max_tokens=6, the client got {len(result.token_ids)} tokens"


# 7. A healthy decode worker is blamed for a prefill's failure: when the decode admission already
#    ended (here its KV timeout ran out while the prefill was slow) and the prefill then fails
#    UNAVAILABLE, is_prefill_fault() says "not the prefill's" (decode_call.done()), core._prefill
#    re-raises the PREFILL's UNAVAILABLE, and core.generate takes it for the decode worker's:
#    _report_decode() puts the decode worker into failure backoff and a failover starts.
class _SlowThenDead(prefill_pb2_grpc.PrefillServiceServicer):
    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        await asyncio.sleep(3.0)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker went away")
        yield prefill_pb2.PrefillEvent()  # pragma: no cover


async def test_a_prefill_failure_never_puts_the_healthy_decode_worker_into_backoff(stack) -> None:
    async with gateway_with_prefills(stack, [_SlowThenDead()], "--max-failovers", "0") as gateway:
        async with GatewayClient(gateway, retry=RetryPolicy(max_retries=0)) as client:
            with pytest.raises(GatewayError):
                await client.complete("Hello there", max_tokens=8, temperature=0, timeout=60)
        async with grpc.aio.insecure_channel(gateway) as channel:
            stats = await gateway_pb2_grpc.GatewayServiceStub(channel).Stats(common_pb2.StatsRequest(), timeout=10)
    decode = next(worker for worker in stats.workers if worker.address == stack["decode"])
    assert (decode.consecutive_failures, decode.last_failure) == (0, ""), decode


# 8. "A step running past --step-timeout-seconds: the worker turns NOT_SERVING and exits non-zero,
#    so its supervisor restarts it." It never exits: the stuck step still occupies the model
#    thread (a ThreadPoolExecutor worker, non-daemon); ModelThread.shutdown(wait=False) returns,
#    but at interpreter exit concurrent.futures joins every executor thread, so the process
#    hangs forever after closing its port (docker-compose's restart policy never fires).
_HUNG_STEP = """
import sys, time
import services.decode.paged_runner as runner
runner.PagedRunner.step = lambda self, batch: time.sleep(10**6)  # a model step that never returns
from services.decode.__main__ import main
sys.argv = ["decode", *sys.argv[1:]]
main()
"""


async def test_decode_worker_whose_step_hangs_exits_non_zero(tmp_path) -> None:
    import subprocess
    import sys

    port = free_port()
    log = open(tmp_path / "decode.log", "wb")
    process = subprocess.Popen([sys.executable, "-c", _HUNG_STEP, "--port", str(port), "--metrics-port", "0",
                                "--model", "tiny", "--step-timeout-seconds", "1"], stdout=log,
                               stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        async with grpc.aio.insecure_channel(address) as channel:
            health_stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert process.poll() is None and time.monotonic() < deadline, "decode worker did not start"
                try:
                    if (await health_stub.Check(health_pb2.HealthCheckRequest(), timeout=1)).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)
            call = decode_pb2_grpc.DecodeServiceStub(channel).Generate(decode_pb2.DecodeRequest(
                request_id="hung-step", prompt_token_ids=PROMPT, kv_source=decode_pb2.KV_SOURCE_LOCAL,
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=4)), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in call:
                    pass
        try:
            code = await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            pytest.fail("the decode worker gave up on its stuck step but never exited (still running 30 s later); "
                        "log tail: " + (tmp_path / "decode.log").read_text()[-600:])
        assert code != 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


async def test_a_model_job_cancelled_while_queued_leaves_the_queue_count() -> None:
    """A local prefill whose request was released while it waited for the model thread never runs;
    the queue gauge must not count it for ever."""
    from services.common.model_thread import ModelThread

    thread, gate = ModelThread(), threading.Event()
    try:
        blocker = asyncio.ensure_future(thread.run(gate.wait, 10))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(thread.run(lambda: None))
        await asyncio.sleep(0.05)
        assert thread.queued == 1
        waiting.cancel()
        gate.set()
        await blocker
        await asyncio.sleep(0.05)
        assert thread.queued == 0
    finally:
        gate.set()
        thread.shutdown()
