"""Shared fixtures: real service processes on free loopback ports, a real Redis, the real model."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path

import grpc
import pytest

from services.common.model_files import default_cache_dir, resolve_model_dir
from services.common.runtime import ModelRuntime
from services.common.tls import TlsFiles
from services.decode.panel_products import PanelKernel
from services.gateway.text import PromptEncoder
from tests.engine_harness import Harness, started
from tests.otlp_receiver import SpanSink, start_receiver
from tests.membership_helpers import PINNED_PLACEMENT
from tests.redis_server import RedisServer, redis_alive
from services.stack import ServiceSpec, Stack, free_port, local_stack

SERVICE_NAMES = ("gateway", "prefill", "decode", "kvstore")
API_KEY = "test-key-123"
TOOLS_TEMPLATE = (Path(__file__).resolve().parent.parent / "services" / "gateway" / "chat_templates"
                  / "chatml_tools.jinja")
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The machine's Redis at 127.0.0.1:6379, or a private redis-server if that one is down."""
    url = "redis://127.0.0.1:6379/0"
    if redis_alive(url):
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may kill and restart."""
    server = RedisServer(tmp_path_factory.mktemp("private-redis"))
    server.start()
    yield server
    server.stop()


class RunningStack:
    """A started Stack and the addresses of its services (extra gateways included)."""

    def __init__(self, stack: Stack, addresses: dict[str, str], metrics_ports: dict[str, int]) -> None:
        self.stack = stack
        self.addresses = addresses
        self.metrics_ports = metrics_ports

    def __getitem__(self, name: str) -> str:
        return self.addresses[name]


def dump_logs(log_dir: Path) -> None:
    """The end of every service log, for a stack that failed to start (pytest shows it)."""
    for log in sorted(log_dir.glob("*.log")):
        print(f"==== {log.name}\n{log.read_text()[-3000:]}")


def start_stack(log_dir: Path, model: str, kvstore_backend: str = "memory", redis_url: str = "",
                extra: Mapping[str, Sequence[str]] | None = None, extra_gateways: Mapping[str, Sequence[str]] = {},
                wait_for: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                tls: Mapping[str, TlsFiles] | None = None) -> RunningStack:
    """`tls`: TLS files per service name (extra gateways use the gateway's); "client" is what the
    health checks present."""
    ports = {name: free_port() for name in (*SERVICE_NAMES, "http")}
    metrics_ports = {name: free_port() for name in (*SERVICE_NAMES, *extra_gateways)}
    extra = {**(extra or {}), "gateway": (*PINNED_PLACEMENT, *(extra or {}).get("gateway", ()))}
    specs = local_stack(ports, model, kvstore_backend, "direct", redis_url or "redis://127.0.0.1:6379/0",
                        extra=extra, log_level="DEBUG", metrics_ports=metrics_ports, tls=tls)
    env = dict(env or {})
    specs = [ServiceSpec(spec.name, spec.module, spec.port, spec.args, {**spec.env, **env}) for spec in specs]
    gateway = next(spec for spec in specs if spec.name == "gateway")
    for name, args in extra_gateways.items():
        port = free_port()
        specs.append(ServiceSpec(name, "gateway", port, (*gateway.args, "--port", str(port), "--http-port", "0",
                                                         "--metrics-port", str(metrics_ports[name]), *args),
                                 gateway.env))
    stack = Stack(specs, log_dir=str(log_dir), tls=(tls or {}).get("client"))
    stack.start()
    try:
        waited = Stack([s for s in specs if wait_for is None or s.name in wait_for], tls=stack.tls)
        waited.processes = stack.processes
        waited.wait_healthy(timeout=300)
    except Exception:
        stack.stop()
        dump_logs(log_dir)
        raise
    scheme = "https" if tls else "http"
    addresses = {spec.name: spec.address for spec in specs} | {"http": f"{scheme}://127.0.0.1:{ports['http']}"}
    return RunningStack(stack, addresses, metrics_ports)


def add_service(running: RunningStack, name: str, like: str, *args: str) -> str:
    """Start one more process like the stack's service `like`, on a free port, with `args` added (a
    later flag wins over an earlier one); wait until it is SERVING; return its address."""
    base = next(spec for spec in running.stack.specs if spec.name == like)
    port = free_port()
    spec = ServiceSpec(name, base.module, port, (*base.args, "--port", str(port), "--metrics-port", "0",
                                                 *(("--http-port", "0") if base.module == "gateway" else ()),
                                                 *args), base.env)
    running.stack.specs.append(spec)
    running.stack.start_one(spec)
    waiting = Stack([spec])
    waiting.processes = running.stack.processes
    waiting.wait_healthy(timeout=300)
    running.addresses[name] = spec.address
    return spec.address


async def busy_decode(running: RunningStack, gateway: str, names: Sequence[str]) -> str:
    """The one decode worker (of `names`) that `gateway` has a request on."""
    from services.common.pb import common_pb2, gateway_pb2_grpc

    async with grpc.aio.insecure_channel(running[gateway]) as channel:
        stats = await gateway_pb2_grpc.GatewayServiceStub(channel).Stats(common_pb2.StatsRequest())
    busy = [w.address for w in stats.workers if w.role == "decode" and w.active_requests]
    assert len(busy) == 1, stats
    return next(name for name in names if running[name] == busy[0])


@pytest.fixture(scope="session")
async def receiver() -> Iterator[SpanSink]:
    """An OTLP/gRPC trace receiver on a free loopback port (its port is `receiver.port`)."""
    sink, server, port = await start_receiver()
    sink.port = port
    yield sink
    await server.stop(0)


def reference_model(model: str) -> ModelRuntime:
    """`model` in float32 in the test process: its `reference_generate` is Hugging Face `generate`."""
    return ModelRuntime(model, "float32", "cpu", default_cache_dir())


def prompt_encoder(model: str) -> PromptEncoder:
    """The gateway's tokenizer and chat template of `model`."""
    return PromptEncoder(resolve_model_dir(model, default_cache_dir()))


@pytest.fixture(scope="session")
def tiny() -> ModelRuntime:
    """The tiny random-weight model in float32, in the test process."""
    return reference_model("tiny")


@pytest.fixture
async def harness(tiny: ModelRuntime) -> AsyncIterator[Harness]:
    """A decode engine in-process on `tiny`, its loop running (tests/engine_harness.py)."""
    async with started(tiny) as running:
        yield running


@pytest.fixture(scope="session")
def kernel() -> PanelKernel:
    """The panel kernel of batched steps and prompt products, built for this machine."""
    built = PanelKernel.build(default_cache_dir())
    if isinstance(built, str):
        pytest.skip(f"the panel kernel cannot be built here: {built}")
    return built


@pytest.fixture(scope="session")
def runtime() -> ModelRuntime:
    """The real SmolLM2 model: the Hugging Face reference."""
    return reference_model("default")


@pytest.fixture(scope="session")
def encoder() -> PromptEncoder:
    return prompt_encoder("default")


def start_healthy(stack: Stack, log_dir: Path, timeout: float = 300) -> None:
    """Start every process of `stack` and wait until each is SERVING; on failure stop them and
    show the end of their logs."""
    stack.start()
    try:
        stack.wait_healthy(timeout=timeout)
    except Exception:
        stack.stop()
        dump_logs(log_dir)
        raise


def _gemv_helper() -> tuple[str, ...]:
    cores = sorted(os.sched_getaffinity(0))
    return ("--gemv-helpers", str(cores[-1])) if len(cores) > 1 else ()


@pytest.fixture(scope="session")
def memory_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """Real model; memory kvstore; the prefill checkpoints KV to it; small chunks so that a
    transfer has many; batched steps on the panel kernel (auto may keep oneDNN on another
    machine: the exactness tests run on the kernel everywhere); a stream alone helped by a thread
    on the last core (auto gives none to a worker without a placement: the exactness tests run
    helped); gateways for the direct and the kvstore path."""
    keyed_http, tools_http, shared_http = free_port(), free_port(), free_port()
    running = start_stack(
        tmp_path_factory.mktemp("memory-stack"), "default",
        extra={"prefill": ("--kv-chunk-tokens", "4", "--kv-chunk-layers", "8", "--checkpoint-kv"),
               "decode": ("--max-chunk-mb", "2", "--batched-products", "native", *_gemv_helper())},
        extra_gateways={"gateway_kvstore": ("--kv-transfer", "kvstore"),
                        "gateway_keyed": ("--api-keys", f"{API_KEY},another-key", "--http-port", str(keyed_http)),
                        "gateway_unified": ("--prefill-mode", "unified"),
                        "gateway_conditional": ("--prefill-mode", "conditional", "--conditional-threshold", "7"),
                        "gateway_adaptive": ("--prefill-mode", "adaptive"),
                        "gateway_tools": ("--chat-template", str(TOOLS_TEMPLATE), "--http-port", str(tools_http)),
                        "gateway_shared": ("--api-keys", f"{API_KEY},another-key", "--prefix-cache-sharing",
                                           "--http-port", str(shared_http))})
    running.addresses["http_keyed"] = f"http://127.0.0.1:{keyed_http}"
    running.addresses["http_tools"] = f"http://127.0.0.1:{tools_http}"
    running.addresses["http_shared"] = f"http://127.0.0.1:{shared_http}"
    yield running
    running.stack.stop()


@pytest.fixture(scope="session")
def redis_stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[RunningStack]:
    """Real model; kvstore on Redis; gateways for the direct and the kvstore path."""
    running = start_stack(
        tmp_path_factory.mktemp("redis-stack"), "default", "redis", redis_url,
        extra={"prefill": ("--checkpoint-kv",),
               "kvstore": ("--redis-key-prefix", f"disagg-test-{free_port()}", "--redis-part-mb", "0.05")},
        extra_gateways={"gateway_kvstore": ("--kv-transfer", "kvstore")})
    yield running
    running.stack.stop()


# Modules `make test` leaves out to stay under 20 minutes on 2 cores; `make test-slow` runs them
# (real processes killed and restarted, fault injection, TLS handshakes, transports, benchmarks).
SLOW_MODULES = frozenset({
    "tests.faults.test_cancel_stages", "tests.faults.test_store_faults", "tests.faults.test_worker_faults",
    "tests.test_batching", "tests.test_bench", "tests.test_compose", "tests.test_decode_hardening",
    "tests.test_failover",
    "tests.test_kv_fp8_services", "tests.test_kvstore_service", "tests.test_kvstore_shm", "tests.test_lm_eval",
    "tests.test_prefill_faults", "tests.test_shm_transport", "tests.test_soak", "tests.test_tls",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
