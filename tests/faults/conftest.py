"""The fault-injection stack: the real model, two prefill and two decode workers, a decode worker
with a small pool (preemption with swap), a kvstore on a Redis of the suite's own (killed and
restarted by the tests), and gateways in front. Every scenario ends by checking that nothing is
held anywhere: no request or block on a decode worker, no request on a prefill worker or the
gateway, no key in the kvstore."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from services.stack import Stack
from tests.conftest import RunningStack, add_service, start_stack
from tests.held import Services
from tests.held import assert_nothing_held as shared_assert_nothing_held
from tests.redis_server import RedisServer

DECODES = ("decode", "decode2", "decode_small")
PREFILLS = ("prefill", "prefill2")
GATEWAYS = ("gateway", "gateway_pair", "gateway_kvstore", "gateway_small")
FAULT_SERVICES = Services(DECODES, PREFILLS, GATEWAYS)
PREFILL_TIMEOUT_SECONDS = 8


@pytest.fixture(scope="session")
def fault_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("fault-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def faults(tmp_path_factory: pytest.TempPathFactory, fault_redis: RedisServer) -> Iterator[RunningStack]:
    running = start_stack(tmp_path_factory.mktemp("faults"), "default", "redis", fault_redis.url,
                          extra={"prefill": ("--checkpoint-kv", "--kv-chunk-layers", "2"),
                                 "decode": ("--kv-timeout-seconds", "60")},
                          extra_gateways={"gateway_kvstore": ("--kv-transfer", "kvstore")})
    try:
        prefill2 = add_service(running, "prefill2", "prefill")
        decode2 = add_service(running, "decode2", "decode")
        small = add_service(running, "decode_small", "decode", "--kv-pool-blocks", "14", "--block-size", "16")
        add_service(running, "gateway_pair", "gateway", "--prefill-addresses", f"{running['prefill']},{prefill2}",
                    "--decode-addresses", f"{running['decode']},{decode2}",
                    "--prefill-timeout-seconds", str(PREFILL_TIMEOUT_SECONDS))
        add_service(running, "gateway_small", "gateway", "--decode-addresses", small)
        yield running
    finally:
        running.stack.stop()


def restart(running: RunningStack, name: str) -> None:
    """Start a killed service again, with the same command, and wait until it serves."""
    spec = next(spec for spec in running.stack.specs if spec.name == name)
    process = running.stack.processes[name]
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.kill()
    process.wait()
    running.stack.start_one(spec)
    waiting = Stack([spec])
    waiting.processes = running.stack.processes
    waiting.wait_healthy(timeout=300)


async def assert_nothing_held(stack: RunningStack, seconds: float = 15.0) -> None:
    """Within `seconds`, nothing is held anywhere in the fault-injection stack."""
    await shared_assert_nothing_held(stack, FAULT_SERVICES, seconds)
