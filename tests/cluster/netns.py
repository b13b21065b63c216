"""Hosts for the multi-host tests: one network namespace per host, each with its own veth interface
(eth0) and IP on a LAN, a Linux bridge in a namespace of its own (so the root namespace's netfilter
rules never see the traffic). The root namespace (the test process) has a veth on the LAN too,
with the subnet's last address, so it reaches every host directly: health checks, clients, Stats.

Every name starts with `dg<pid>` (the pid of the test process), so runs never collide; a
namespace left by a run whose process is gone is removed by the next run. Everything is removed
on `close` (deleting a namespace removes the veth ends in it, and with them their peers).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_SECONDS = 15.0
SUBNETS = ipaddress.ip_network("10.77.0.0/16")
_OURS = re.compile(r"^dg(\d+)-")


class NamespaceError(RuntimeError):
    """An `ip` or `tc` command failed."""


def run(*command: str, namespace: str | None = None) -> str:
    """Run a command (inside `namespace` when given); NamespaceError with its output if it fails."""
    full = ["ip", "netns", "exec", namespace, *command] if namespace else list(command)
    try:
        done = subprocess.run(full, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NamespaceError(f"{' '.join(full)}: {exc}") from exc
    if done.returncode != 0:
        raise NamespaceError(f"{' '.join(full)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here (None when they can): not root, or `ip netns
    add` fails."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"dg{os.getpid()}-probe"
    try:
        run("ip", "netns", "add", probe)
    except NamespaceError as exc:
        return f"cannot create a network namespace: {exc}"
    run("ip", "netns", "del", probe)
    return None


def remove_stale() -> None:
    """Delete namespaces of earlier runs whose test process is gone."""
    for line in run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        match = _OURS.match(name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            log.info("removing stale namespace %s", name)
            try:
                run("ip", "netns", "del", name)
            except NamespaceError as exc:
                log.warning("%s", exc)


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 10.77.0.0/16 that no address or route of the root namespace uses (starting from
    one picked by the pid, so concurrent runs rarely even try the same)."""
    used = run("ip", "-4", "-o", "addr") + run("ip", "-4", "route")
    subnets = list(SUBNETS.subnets(new_prefix=24))
    start = os.getpid() % len(subnets)
    for subnet in subnets[start:] + subnets[:start]:
        if f"{subnet.network_address}".rsplit(".", 1)[0] + "." not in used:
            return subnet
    raise NamespaceError("no free /24 in 10.77.0.0/16")


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    namespace: str
    ip: str

    @property
    def launcher(self) -> tuple[str, ...]:
        """What runs a command on this host."""
        return ("ip", "netns", "exec", self.namespace)


class Lan:
    """Hosts on one bridge; see the module docstring."""

    def __init__(self) -> None:
        remove_stale()
        self.prefix = f"dg{os.getpid()}"
        self.subnet = free_subnet()
        self._addresses = iter(self.subnet.hosts())
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._bridge = f"{self.prefix}-lan"
        try:
            self._namespace(self._bridge)
            run("ip", "link", "add", "br0", "type", "bridge", namespace=self._bridge)
            run("ip", "link", "set", "br0", "up", namespace=self._bridge)
            root = f"{self.prefix}r"
            run("ip", "link", "add", root, "type", "veth", "peer", "name", f"{self.prefix}rb", "netns", self._bridge)
            self._plug(f"{self.prefix}rb")
            last = self.subnet.broadcast_address - 1
            run("ip", "addr", "add", f"{last}/{self.subnet.prefixlen}", "dev", root)
            run("ip", "link", "set", root, "up")
        except Exception:
            self.close()
            raise

    def add(self, name: str) -> Host:
        """A new host on the LAN: its namespace, eth0 and next IP."""
        host = Host(name, f"{self.prefix}-{name}", str(next(self._addresses)))
        self._namespace(host.namespace)
        port = f"{self.prefix}p{len(self.hosts)}"
        run("ip", "link", "add", port, "netns", self._bridge, "type", "veth", "peer", "name", "eth0",
            "netns", host.namespace)
        self._plug(port)
        run("ip", "addr", "add", f"{host.ip}/{self.subnet.prefixlen}", "dev", "eth0", namespace=host.namespace)
        run("ip", "link", "set", "eth0", "up", namespace=host.namespace)
        self.hosts[name] = host
        return host

    def _namespace(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self._namespaces.append(name)
        run("ip", "link", "set", "lo", "up", namespace=name)

    def _plug(self, port: str) -> None:
        run("ip", "link", "set", port, "master", "br0", namespace=self._bridge)
        run("ip", "link", "set", port, "up", namespace=self._bridge)

    def close(self) -> None:
        """Remove every namespace (and so every veth and the bridge); never raises."""
        for name in reversed(self._namespaces):
            try:
                run("ip", "netns", "del", name)
            except NamespaceError as exc:
                log.warning("%s", exc)
        self._namespaces.clear()
