"""gRPC targets for one address or several.

One address (`host:port`, or any gRPC target such as `dns:///name:port`) is dialled as it is. A
comma separated list (`10.0.0.1:50051,10.0.0.2:50051`, or a sequence) becomes one channel over
every address: the target `ipv4:a:p,b:p` (or `ipv6:`), gRPC's `round_robin` load balancing, and
client-side health checking on the standard health service, so new calls go only to a server
whose health is SERVING: one that drains after SIGTERM (health NOT_SERVING at once), restarts or is
down is passed over, and the others take its calls. The channel reconnects to a server that was
down at least every second (gRPC's own backoff grows to 2 minutes), so a restarted one is back in
the rotation as soon as it serves.

Names in a list are resolved once, when the channel is made (IPv4 first, like the gateway's
worker lists). TLS verifies every server's certificate against the first entry's host (gRPC's
default authority) unless a server name is given (`ssl_target_name_override`).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.config import split_addresses

SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                             "healthCheckConfig": {"serviceName": ""}})
# A channel to a peer that was down retries its connection at least every second (gRPC's default
# backoff grows to 120 s), so a server that comes back is seen at once. Every channel has them.
RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (("grpc.initial_reconnect_backoff_ms", 250),
                                                  ("grpc.max_reconnect_backoff_ms", 1000))


def split_host_port(address: str) -> tuple[str, str]:
    """'host:port' or '[v6]:port' -> (host, port); ValueError when it is neither."""
    host, _, port = address.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), port


def join_host_port(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def address_list(address: str | Sequence[str]) -> list[str]:
    """The entries of a comma separated list (or a sequence), without blanks or repeats."""
    parts = split_addresses(address) if isinstance(address, str) else [part.strip() for part in address]
    return list(dict.fromkeys(part for part in parts if part))


def check_address_list(name: str, address: str) -> None:
    """ValueError naming the setting unless every entry of `address` is host:port."""
    for entry in address_list(address):
        try:
            split_host_port(entry)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None


@dataclass(frozen=True, slots=True)
class ChannelTarget:
    """What a channel dials, and the channel options that go with it."""

    target: str
    options: tuple[tuple[str, str | int], ...] = ()
    addresses: int = 1  # servers behind the target


def ipv4_first(infos: Sequence[tuple[object, ...]]) -> list[str]:
    """The addresses of a getaddrinfo answer: its IPv4 ones if it has any, else all; no repeats."""
    ipv4 = [str(info[4][0]) for info in infos if info[0] == socket.AF_INET]  # type: ignore[index]
    return list(dict.fromkeys(ipv4 or [str(info[4][0]) for info in infos]))  # type: ignore[index]


def _ips(host: str, port: str) -> list[str]:
    if is_ip(host):
        return [host]
    return ipv4_first(socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM))


@functools.lru_cache(maxsize=64)
def _several(entries: tuple[str, ...]) -> ChannelTarget:
    resolved: list[str] = []
    families: set[int] = set()
    for entry in entries:
        host, port = split_host_port(entry)
        for ip in _ips(host, port):
            families.add(ipaddress.ip_address(ip).version)
            resolved.append(join_host_port(ip, port))
    if len(families) > 1:
        raise ValueError(f"addresses {','.join(entries)!r} mix IPv4 and IPv6; list one family")
    scheme = "ipv6" if families == {6} else "ipv4"
    unique = list(dict.fromkeys(resolved))
    options = (("grpc.service_config", SERVICE_CONFIG), ("grpc.default_authority", entries[0]))
    return ChannelTarget(f"{scheme}:{','.join(unique)}", options, len(unique))


def channel_target(address: str | Sequence[str]) -> ChannelTarget:
    """The target of one address (as it is) or of several (see the module docstring)."""
    entries = address_list(address)
    if not entries:
        raise ValueError("no address given")
    if len(entries) == 1:
        return ChannelTarget(entries[0])
    return _several(tuple(entries))
