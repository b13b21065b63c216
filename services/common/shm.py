"""POSIX shared-memory segments for bulk KV bytes between processes on one host.

Names are never fixed: `<prefix>.<pid namespace>.<pid>.<process start>.<random>`, so a segment
says which process made it. The creator owns a segment and is the only one that unlinks it;
attachers map it and close their mapping, nothing more. A process killed before it unlinked
leaves its segments behind; `reap_orphans` (run by each service at start and on a timer) unlinks
those whose creator is gone. It judges only segments of its own prefix and its own pid
namespace: a pid from another namespace says nothing about liveness here.

Python before 3.13 registers an attached segment with the resource tracker, which unlinks it when
the attaching process exits (bpo-39959); `attach` undoes that registration (or passes
`track=False` where it exists), so an attacher exiting never destroys the creator's segment.

`write_segment`/`read_segment` move a whole value through a segment by its file (no mapping kept,
no file descriptor held, no resource tracker): a write into a full /dev/shm is an OSError
(ENOSPC), never the SIGBUS that touching an over-committed mapping raises.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import os
import re
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import TypeVar

import numpy

log = logging.getLogger(__name__)
T = TypeVar("T")
THREAD_FROM_BYTES = 1 << 16  # smaller copies run on the event loop: a thread hop would cost more

SHM_DIR = Path("/dev/shm")
_LIBC = ctypes.CDLL(None, use_errno=True)  # its calls leave the GIL to other threads
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
_NAME_RE = re.compile(r"^(?P<prefix>[a-z][a-z0-9-]{0,39})\.(?P<pidns>\d+)\.(?P<pid>\d+)\.(?P<start>\d+)\.[0-9a-f]{16}$")


def check_prefix(prefix: str) -> str:
    """A segment prefix: lowercase letters, digits and dashes, at most 40 (raises ValueError)."""
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"shared-memory prefix {prefix!r} must match {_PREFIX_RE.pattern}")
    return prefix


def _ns_inode(kind: str) -> int:
    try:
        return os.stat(f"/proc/self/ns/{kind}").st_ino
    except OSError:
        return 0


def _process_start(pid: int) -> int | None:
    """Clock ticks after boot when `pid` started (tells a pid from its reuse); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name before ")" may hold spaces


def host_identity() -> str:
    """Equal for two processes exactly when they can map the same segments: same kernel boot, same
    IPC namespace and the same /dev/shm mount (containers with private /dev/shm differ)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown-boot"
    try:
        shm_device = os.stat(SHM_DIR).st_dev
    except OSError:
        shm_device = 0
    raw = f"{boot_id}|{_ns_inode('ipc')}|{shm_device}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def new_segment_name(prefix: str) -> str:
    pid = os.getpid()
    return f"{check_prefix(prefix)}.{_ns_inode('pid')}.{pid}.{_process_start(pid) or 0}.{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class SegmentOwner:
    """Who created a segment, read back from its name."""

    prefix: str
    pid_namespace: int
    pid: int
    process_start: int


def owner_of(name: str) -> SegmentOwner | None:
    """The creator a segment name records, or None for a name this module did not make."""
    match = _NAME_RE.match(name)
    if match is None:
        return None
    return SegmentOwner(match["prefix"], int(match["pidns"]), int(match["pid"]), int(match["start"]))


def create(prefix: str, size: int, reserve: bool = False) -> SharedMemory:
    """A new segment of `size` bytes (> 0) owned by this process; unlink it with `destroy`.
    `reserve` allocates its pages now, so a full /dev/shm is an OSError (ENOSPC) here instead of
    a SIGBUS at the first write into a page tmpfs cannot back."""
    if size <= 0:
        raise ValueError(f"a shared-memory segment needs a size > 0, got {size}")
    segment = SharedMemory(name=new_segment_name(prefix), create=True, size=size)
    if reserve:
        try:
            allocate(segment)
        except OSError:
            destroy(segment)
            raise
    return segment


def allocate(segment: SharedMemory) -> None:
    """Back every page of a segment this process created now (OSError ENOSPC when /dev/shm is
    full), so no later write into it can fault with SIGBUS."""
    os.posix_fallocate(segment._fd, 0, segment.size)  # type: ignore[attr-defined]


MADV_POPULATE_READ = 22  # Linux 5.14+; Python's mmap names them only from 3.13
MADV_POPULATE_WRITE = 23


def map_for_writing(segment: SharedMemory) -> None:
    """Map every page of an allocated segment into this process, writable, in one call where the
    kernel can (Linux 5.14+; elsewhere a no-op): writing into unmapped pages costs a page fault
    per 4 KB page, which measured 5x slower for a transfer's 94 MB. Blocking, but without the GIL
    (libc's madvise through ctypes; mmap.madvise holds it for the whole call): run it off the loop."""
    _populate(segment, MADV_POPULATE_WRITE)


def map_for_reading(segment: SharedMemory) -> None:
    """Map every page of an attached segment into this process, readable (as `map_for_writing`):
    a reader that would fault its pages in one by one while copying them does it ahead instead."""
    _populate(segment, MADV_POPULATE_READ)


def _populate(segment: SharedMemory, advice: int) -> None:
    buf = segment.buf
    if buf is None:  # closed meanwhile: nothing to map
        return
    try:
        view = numpy.frombuffer(buf, numpy.uint8)  # the mapping's address, kept mapped meanwhile
    except (TypeError, ValueError):  # closed meanwhile: nothing to map
        return
    try:
        _LIBC.madvise(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(view.size), advice)
    finally:
        del view  # an export left alive would keep the segment from closing


def attach(name: str) -> SharedMemory:
    """Map an existing segment without taking ownership: closing or exiting never unlinks it.
    Raises FileNotFoundError when no such segment exists, ValueError for a name this module
    did not make (so a descriptor cannot point an attacher at an arbitrary file)."""
    if owner_of(name) is None:
        raise ValueError(f"{name!r} is not a segment name of this project")
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, create=False, track=False)  # type: ignore[call-arg]
    segment = SharedMemory(name=name, create=False)
    resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
    return segment


def destroy(segment: SharedMemory) -> None:
    """Unlink and close a segment this process created (a second call does nothing). The name goes
    first: a mapping still exported (a copy running in a thread) cannot be closed yet, and is
    then unmapped when the last view of it is dropped."""
    unlink_segment(segment)
    close(segment)


def unlink_segment(segment: SharedMemory) -> None:
    """Remove a segment's name (fast; idempotent). Its pages are freed when the last mapping is
    closed, which for a large segment takes a while (~30 ms for 94 MB)."""
    try:
        segment.unlink()
    except FileNotFoundError:
        pass


def close(segment: SharedMemory) -> None:
    """Close this process's mapping; if views of it are still alive it is unmapped when they go.
    Its file descriptor is closed either way (the mapping holds one of its own): left open, it
    would keep an unlinked segment's pages allocated for as long as this process runs."""
    try:
        segment.close()
    except BufferError:
        log.debug("segment %s still has live views; it is unmapped when they are dropped", segment.name)
        if segment._fd >= 0:  # type: ignore[attr-defined]
            os.close(segment._fd)  # type: ignore[attr-defined]
            segment._fd = -1  # type: ignore[attr-defined]


def _creator_alive(owner: SegmentOwner) -> bool:
    start = _process_start(owner.pid)
    return start is not None and (owner.process_start == 0 or start == owner.process_start)


def reap_orphans(prefix: str, shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink segments of `prefix` whose creator (in this pid namespace) is no longer running;
    returns their names."""
    check_prefix(prefix)
    pid_namespace = _ns_inode("pid")
    reaped: list[str] = []
    try:
        entries = list(shm_dir.iterdir())
    except OSError:
        return reaped
    for entry in entries:
        owner = owner_of(entry.name)
        if owner is None or owner.prefix != prefix or owner.pid_namespace != pid_namespace:
            continue
        if _creator_alive(owner):
            continue
        try:
            entry.unlink()
        except FileNotFoundError:
            continue
        reaped.append(entry.name)
    if reaped:
        log.warning("reaped %d shared-memory segment(s) of dead %s processes", len(reaped), prefix)
    return reaped


def segments_of(prefix: str, shm_dir: Path = SHM_DIR) -> list[str]:
    """Names of the segments of `prefix` now in /dev/shm (tests and stats)."""
    try:
        return sorted(e.name for e in shm_dir.iterdir() if (o := owner_of(e.name)) and o.prefix == prefix)
    except OSError:
        return []


def write_segment(prefix: str, data: bytes | bytearray | memoryview) -> str:
    """A new segment holding exactly `data` (a single zero byte when `data` is empty: a segment
    cannot be empty), owned by this process; returns its name. Nothing stays open or mapped; on
    any failure (OSError: ENOSPC when /dev/shm is full) nothing is left behind."""
    name = new_segment_name(prefix)
    fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data).cast("B") if len(data) else memoryview(b"\0")
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        unlink(name)
        raise
    os.close(fd)
    return name


def read_segment(name: str, length: int) -> bytes:
    """The `length` bytes a segment written by `write_segment` holds. Raises FileNotFoundError
    when it does not exist (any more), ValueError for a name this module did not make or a
    segment whose size is not that of a `length`-byte value."""
    if owner_of(name) is None:
        raise ValueError(f"{name!r} is not a segment name of this project")
    fd = os.open(SHM_DIR / name, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        if size != max(1, length):
            raise ValueError(f"segment {name} holds {size} bytes, not a {length}-byte value")
        data = os.read(fd, length) if length else b""
        if len(data) != length:
            raise ValueError(f"segment {name} gave {len(data)} of its {length} bytes")
        return data
    finally:
        os.close(fd)


def unlink(name: str) -> bool:
    """Remove a segment this process created by name; False when it was already gone."""
    try:
        (SHM_DIR / name).unlink()
    except FileNotFoundError:
        return False
    return True


async def off_loop(size: int, work: Callable[..., T], *args: object) -> T:
    """`work(*args)`, which moves `size` bytes: in a worker thread when that is THREAD_FROM_BYTES or
    more, so that the event loop goes on meanwhile."""
    if size < THREAD_FROM_BYTES:
        return work(*args)
    return await asyncio.to_thread(work, *args)
