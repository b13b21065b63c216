"""The rolling-restart stack and its moves: two of every service on loopback (tiny model), the
kvstores on one Redis, and a restart that is graceful the whole way: SIGTERM, exit 0, the same
command again, SERVING, and back in rotation before the next instance goes.

    kvstore, kvstore2     --backend redis, one Redis: a restarted kvstore still has every value
    prefill, prefill2     --kvstore-address kvstore,kvstore2 --checkpoint-kv
    decode, decode2       --kvstore-address kvstore,kvstore2
    gateway               both prefill and both decode workers; KV through the kvstore
    gateway2              the same; KV sent directly
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from services.stack import ServiceSpec, Stack, free_port
from tests.held import Services
from tests.membership_helpers import PINNED_PLACEMENT, stop_gracefully, wait_serving, wait_state

ROLES = {"kvstore": ("kvstore", "kvstore2"), "prefill": ("prefill", "prefill2"), "decode": ("decode", "decode2"),
         "gateway": ("gateway", "gateway2")}
SERVICES = Services(ROLES["decode"], ROLES["prefill"], ROLES["gateway"], ROLES["kvstore"])
# The call that shows an instance is back in rotation: new work reached it.
NEW_WORK = {"kvstore": "Put", "prefill": "Prefill", "decode": "Generate", "gateway": "Generate"}
GRACE_SECONDS = 30


@dataclass
class Pairs:
    """The running stack and where its logs go."""

    stack: Stack
    log_dir: Path

    def spec(self, name: str) -> ServiceSpec:
        return next(spec for spec in self.stack.specs if spec.name == name)

    def __getitem__(self, name: str) -> str:
        return self.spec(name).address


def _spec(name: str, module: str, *args: str) -> ServiceSpec:
    port = free_port()
    return ServiceSpec(name, module, port, ("--port", str(port), "--metrics-port", str(free_port()),
                                            "--log-level", "DEBUG", "--grace-seconds", str(GRACE_SECONDS), *args))


def specs(redis_url: str) -> list[ServiceSpec]:
    shared = ("--backend", "redis", "--redis-url", redis_url, "--redis-key-prefix", f"disagg-rolling-{free_port()}")
    kvstores = [_spec(name, "kvstore", *shared) for name in ROLES["kvstore"]]
    worker = ("--model", "tiny", "--kvstore-address", ",".join(spec.address for spec in kvstores))
    prefills = [_spec(name, "prefill", *worker, "--checkpoint-kv") for name in ROLES["prefill"]]
    decodes = [_spec(name, "decode", *worker) for name in ROLES["decode"]]
    routing = ("--model", "tiny", "--http-port", "0", *PINNED_PLACEMENT,
               "--prefill-addresses", ",".join(p.address for p in prefills),
               "--decode-addresses", ",".join(d.address for d in decodes))
    gateways = [_spec("gateway", "gateway", *routing, "--kv-transfer", "kvstore"),
                _spec("gateway2", "gateway", *routing, "--kv-transfer", "direct")]
    return [*kvstores, *prefills, *decodes, *gateways]


def metrics_port(spec: ServiceSpec) -> int:
    return int(spec.args[spec.args.index("--metrics-port") + 1])


def calls_served(spec: ServiceSpec, method: str) -> float:
    """Calls of `method` the process has answered, whatever their status (its /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port(spec)}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "disagg_rpc_requests_total" and sample.labels.get("method") == method)


async def restart(stack: Stack, name: str, timeout: float = 120) -> None:
    """Stop `name` gracefully, start it with the same command, and wait until it is back in
    rotation: SERVING, routed to by every gateway (workers), and answering new work."""
    spec = next(spec for spec in stack.specs if spec.name == name)
    role = next(role for role, names in ROLES.items() if name in names)
    await asyncio.to_thread(stop_gracefully, stack, name, GRACE_SECONDS + 15)
    process = stack.start_one(spec)
    await asyncio.to_thread(wait_serving, spec, process, timeout)
    if role in ("prefill", "decode"):
        for gateway in ROLES["gateway"]:
            gateway_spec = next(s for s in stack.specs if s.name == gateway)
            await wait_state(gateway_spec.address, spec.address, "serving", timeout)
    deadline = time.monotonic() + timeout
    while await asyncio.to_thread(calls_served, spec, NEW_WORK[role]) == 0:
        assert process.poll() is None, f"{name} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"{name} got no {NEW_WORK[role]} call within {timeout}s"
        await asyncio.sleep(0.1)


def start_bench(gateways: str, seconds: float, log: Path) -> subprocess.Popen[str]:
    """`python -m services.bench` against every gateway: 4 requests in flight for `seconds` (or
    until SIGTERM), figures as JSON on stdout."""
    command = [sys.executable, "-m", "services.bench", "--grpc", gateways, "--json", "--concurrency", "4",
               "--duration", str(seconds), "--num-requests", "48", "--prompt-tokens", "8:96", "--output-tokens",
               "8:40", "--warmup", "0", "--seed", "7"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)


def stop_bench(bench: subprocess.Popen[str], timeout: float = 120) -> dict[str, object]:
    """SIGTERM (no new request starts; those in flight finish) and the bench's one run."""
    bench.send_signal(signal.SIGTERM)
    output, _ = bench.communicate(timeout=timeout)
    assert bench.returncode == 0, f"bench exited with {bench.returncode}"
    report = json.loads(output)
    assert report["terminated"] and len(report["runs"]) == 1, report
    return report["runs"][0]
