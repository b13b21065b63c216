"""The multi-host stack: every service on a host of its own (a network namespace on the LAN of
tests/cluster/netns.py), started with `ip netns exec HOST python -m services.X --host ITS_IP`:

    gateway   two gateways on one host: `gateway` (KV sent directly) and `gateway_kvstore` (KV
              through the kvstore), both routing to both prefill workers
    prefill_a, prefill_b   each with an emulated link (tests/cluster/links.py) to the decode host
    decode
    kvstore   (memory backend; the prefill workers checkpoint every transfer to it)

The tiny model; the gateways give a prefill call --prefill-timeout-seconds (8 s) before retrying it
on the other prefill worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.stack import ServiceSpec, Stack, free_port
from tests.cluster.links import Conditions, Link, LinkEmulator
from tests.cluster.netns import Host, Lan
from tests.conftest import RunningStack, start_healthy
from tests.membership_helpers import PINNED_PLACEMENT
from tests.held import Services

PREFILL_TIMEOUT_SECONDS = 8
PREFILLS = ("prefill_a", "prefill_b")
SERVICES = Services(decodes=("decode",), prefills=PREFILLS, gateways=("gateway", "gateway_kvstore"))


@dataclass
class MultiHost:
    running: RunningStack
    hosts: dict[str, Host]
    links: dict[str, Link]  # prefill name -> its link to the decode host
    emulator: LinkEmulator

    def shape(self, conditions: Conditions, *prefills: str) -> None:
        """Apply `conditions` to the links of `prefills` (default: both) to the decode host."""
        for name in prefills or PREFILLS:
            self.emulator.shape(self.links[name], conditions)


def _spec(name: str, module: str, host: Host, *args: str) -> ServiceSpec:
    port = free_port()
    return ServiceSpec(name, module, port, ("--host", host.ip, "--port", str(port), "--metrics-port", "0",
                                            "--log-level", "DEBUG", *args), host=host.ip, launcher=host.launcher)


def specs(hosts: dict[str, Host]) -> list[ServiceSpec]:
    kvstore = _spec("kvstore", "kvstore", hosts["kvstore"], "--backend", "memory")
    worker = ("--model", "tiny", "--kvstore-address", kvstore.address)
    prefills = [_spec(name, "prefill", hosts[name], *worker, "--checkpoint-kv", "--kv-chunk-tokens", "128")
                for name in PREFILLS]
    decode = _spec("decode", "decode", hosts["decode"], *worker)
    routing = ("--model", "tiny", "--http-port", "0", *PINNED_PLACEMENT,
               "--prefill-addresses", ",".join(p.address for p in prefills),
               "--decode-addresses", decode.address, "--prefill-timeout-seconds", str(PREFILL_TIMEOUT_SECONDS))
    gateways = [_spec("gateway", "gateway", hosts["gateway"], *routing),
                _spec("gateway_kvstore", "gateway", hosts["gateway"], *routing, "--kv-transfer", "kvstore")]
    return [kvstore, *prefills, decode, *gateways]


@contextmanager
def multihost(log_dir: Path) -> Iterator[MultiHost]:
    """The stack on its hosts, SERVING; everything removed afterwards, however it ends."""
    lan = Lan()
    emulator: LinkEmulator | None = None
    stack: Stack | None = None
    try:
        hosts = {name: lan.add(name.replace("_", "-")) for name in ("gateway", *PREFILLS, "decode", "kvstore")}
        emulator = LinkEmulator(lan.prefix)
        links = {name: emulator.connect(hosts[name], hosts["decode"]) for name in PREFILLS}
        stack = Stack(specs(hosts), log_dir=str(log_dir))
        start_healthy(stack, log_dir)
        running = RunningStack(stack, {spec.name: spec.address for spec in stack.specs}, {})
        yield MultiHost(running, hosts, links, emulator)
    finally:
        if stack is not None:
            stack.stop()
        if emulator is not None:
            emulator.close()
        lan.close()
