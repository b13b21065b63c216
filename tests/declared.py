"""Start the services the way a deployment file declares them (docker-compose, Kubernetes): exactly
the declared command and environment, with the service host names and declared ports mapped to
free loopback ports and the image's /models folder to the local model cache."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from services.common.model_files import default_cache_dir
from services.stack import ServiceSpec, Stack, free_port

# Started in this order: each service's dependencies come first.
SERVICES = ("kvstore", "prefill", "decode", "gateway")
# Each service's declared gRPC port and metrics port (and the gateway's HTTP port).
DECLARED_PORTS = {"gateway": (50051, 9100, 8000), "prefill": (50052, 9101), "decode": (50053, 9102),
                  "kvstore": (50054, 9103)}


def free_ports() -> dict[int, int]:
    """A free loopback port for every declared port."""
    return {declared: free_port() for ports in DECLARED_PORTS.values() for declared in ports}


def localize(value: str, ports: Mapping[int, int], replacements: Mapping[str, str]) -> str:
    """One declared value as it must be on this machine: `replacements` first (e.g. the Redis URL),
    then listen addresses, service host names, declared ports and the model folder."""
    for old, new in replacements.items():
        value = value.replace(old, new)
    value = value.replace("0.0.0.0", "127.0.0.1").replace("/models", str(default_cache_dir()))
    for declared, port in ports.items():
        value = re.sub(rf"\b(kvstore|prefill|decode|gateway):{declared}\b", f"127.0.0.1:{port}", value)
        if value == str(declared):
            value = str(port)
    return value


def declared_spec(name: str, command: Sequence[str], env: Mapping[str, object], ports: Mapping[int, int],
                  replacements: Mapping[str, str]) -> ServiceSpec:
    """The local process for one declared service; checks that it is one of ours and listens
    (gRPC and metrics) on its declared ports."""
    assert list(command[:2]) == ["python", "-m"] and command[2].startswith("services."), command
    local_env = {key: localize(str(value), ports, replacements) for key, value in env.items()}
    grpc_port, metrics_port = (ports[declared] for declared in DECLARED_PORTS[name][:2])
    assert local_env[f"{name.upper()}_PORT"] == str(grpc_port), (name, env)
    assert local_env[f"{name.upper()}_METRICS_PORT"] == str(metrics_port), (name, env)
    return ServiceSpec(name, command[2].removeprefix("services."), grpc_port, tuple(command[3:]), local_env)


@contextmanager
def running(specs: Sequence[ServiceSpec], log_dir: Path, timeout: float = 300) -> Iterator[Stack]:
    """The services started and SERVING on the gRPC health service; stopped on exit."""
    stack = Stack(specs, log_dir=str(log_dir))
    stack.start()
    try:
        stack.wait_healthy(timeout=timeout)
        yield stack
    finally:
        stack.stop()
