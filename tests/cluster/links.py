"""Emulated network links between two hosts (namespaces): delay, loss, a rate limit and partitions.

`tc netem` is the usual tool, but this machine's kernel is built without it (CONFIG_NET_SCH_NETEM
is not set; `tc qdisc add ... netem` says "Specified qdisc kind is unknown"), and the CI machines
are the same kind. So a link does netem's job in user space: each host gets a TUN interface and a
/32 route sending its traffic for the peer's IP through it, and a forwarding thread moves every IP
packet from one host's TUN to the other's, applying the link's `Conditions` to each (as netem does
on an interface's egress): dropped with probability `loss`, sent after `delay_seconds`, no faster
than `rate_bits` per second, at most `limit` packets queued per direction. Everything else between
the hosts (and the LAN to other hosts) is untouched, so only the shaped pair's traffic is affected.

A TUN device made here (not persistent) disappears when its file descriptor closes, so `close`
(or the test process dying) removes it.
"""

from __future__ import annotations

import fcntl
import os
import random
import selectors
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass

from tests.cluster.netns import Host, run

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
READS_PER_WAKE = 64


@dataclass(frozen=True, slots=True)
class Conditions:
    delay_seconds: float = 0.0
    loss: float = 0.0  # probability that a packet is dropped; 1.0 is a partition
    rate_bits: float = 0.0  # bits per second; 0 is unlimited
    limit: int = 1000  # packets queued per direction (netem's default); more are dropped


PARTITION = Conditions(loss=1.0)


class _Direction:
    """Packets read from one TUN, waiting to be written to the other."""

    def __init__(self, source: int, target: int) -> None:
        self.source, self.target = source, target
        self.queue: deque[tuple[float, bytes]] = deque()
        self.free_at = 0.0  # when the rate limit lets the next packet go
        self.packets = 0  # read from the source
        self.dropped = 0  # of those, lost (loss, partition or a full queue)

    def admit(self, packet: bytes, conditions: Conditions, now: float) -> None:
        self.packets += 1
        if random.random() < conditions.loss or len(self.queue) >= conditions.limit:
            self.dropped += 1
            return
        departs = now
        if conditions.rate_bits:
            departs = max(now, self.free_at) + len(packet) * 8 / conditions.rate_bits
            self.free_at = departs
        self.queue.append((departs + conditions.delay_seconds, packet))

    def deliver(self, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            try:
                os.write(self.target, self.queue.popleft()[1])
            except OSError:  # the interface went away or is down: the packet is lost
                pass


class Link:
    """One emulated link between two hosts."""

    def __init__(self, name: str, a: Host, b: Host) -> None:
        self.name = name
        self.conditions = Conditions()
        self._fds = [_tun(f"{name}a", a, b), _tun(f"{name}b", b, a)]
        self.directions = [_Direction(self._fds[0], self._fds[1]), _Direction(self._fds[1], self._fds[0])]

    def set(self, conditions: Conditions, lock: threading.Lock) -> None:
        """New conditions for packets from now on; a partition also drops what is queued."""
        with lock:
            self.conditions = conditions
            if conditions.loss >= 1.0:
                for direction in self.directions:
                    direction.queue.clear()

    @property
    def packets(self) -> int:
        return sum(direction.packets for direction in self.directions)

    @property
    def dropped(self) -> int:
        return sum(direction.dropped for direction in self.directions)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)


def _tun(device: str, host: Host, peer: Host) -> int:
    """A TUN interface in `host`'s namespace that carries its traffic for `peer`'s IP."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", device.encode(), IFF_TUN | IFF_NO_PI))
        run("ip", "link", "set", device, "netns", host.namespace)
        run("ip", "link", "set", device, "up", namespace=host.namespace)
        run("ip", "route", "add", f"{peer.ip}/32", "dev", device, "src", host.ip, namespace=host.namespace)
    except Exception:
        os.close(fd)
        raise
    return fd


class LinkEmulator:
    """The links of one test run, forwarded by one thread."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._links: dict[str, Link] = {}
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = os.pipe()
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._stopped = False
        self._thread = threading.Thread(target=self._forward, name="link-emulator", daemon=True)
        self._thread.start()

    def connect(self, a: Host, b: Host) -> Link:
        """An emulated link between `a` and `b` (their traffic to each other takes it from now on)."""
        link = Link(f"{self._prefix}t{len(self._links)}", a, b)
        with self._lock:
            self._links[link.name] = link
            for direction in link.directions:
                self._selector.register(direction.source, selectors.EVENT_READ, (link, direction))
        os.write(self._wake_write, b"x")
        return link

    def shape(self, link: Link, conditions: Conditions) -> None:
        link.set(conditions, self._lock)
        os.write(self._wake_write, b"x")

    def _forward(self) -> None:
        while not self._stopped:
            with self._lock:
                heads = [d.queue[0][0] for link in self._links.values() for d in link.directions if d.queue]
            timeout = max(0.0, min(heads) - time.monotonic()) if heads else 0.5
            events = self._selector.select(min(timeout, 0.5))
            with self._lock:
                now = time.monotonic()
                for key, _ in events:
                    if key.data is None:
                        os.read(self._wake_read, 4096)
                        continue
                    link, direction = key.data
                    for _ in range(READS_PER_WAKE):
                        try:
                            direction.admit(os.read(direction.source, 65536), link.conditions, now)
                        except OSError:  # BlockingIOError: nothing more to read
                            break
                for link in self._links.values():
                    for direction in link.directions:
                        direction.deliver(time.monotonic())

    def close(self) -> None:
        self._stopped = True
        os.write(self._wake_write, b"x")
        self._thread.join(timeout=5)
        for link in self._links.values():
            link.close()
        self._selector.close()
        os.close(self._wake_read)
        os.close(self._wake_write)
