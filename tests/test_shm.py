"""Shared-memory segments: attachers never unlink, orphans of killed creators are reaped, and only
names this project made can be attached."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from services.common import shm

_ATTACH_AND_EXIT = """
import sys
from services.common import shm
segment = shm.attach(sys.argv[1])
assert bytes(segment.buf[:5]) == b"hello"
segment.close()
"""

_CREATE_AND_WAIT = """
import sys, time
from services.common import shm
segment = shm.create(sys.argv[1], 4096)
print(segment.name, flush=True)
time.sleep(60)
"""


def _prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def test_an_attacher_exiting_leaves_the_creators_segment_in_place() -> None:
    segment = shm.create(_prefix(), 4096)
    try:
        segment.buf[:5] = b"hello"
        subprocess.run([sys.executable, "-c", _ATTACH_AND_EXIT, segment.name], check=True, timeout=60)
        assert (shm.SHM_DIR / segment.name).exists()
        again = shm.attach(segment.name)
        assert bytes(again.buf[:5]) == b"hello"
        again.close()
    finally:
        shm.destroy(segment)
    assert not (shm.SHM_DIR / segment.name).exists()
    shm.destroy(segment)  # a second destroy is harmless


def test_segments_of_a_creator_killed_with_sigkill_are_gone_after_the_reaper() -> None:
    prefix = _prefix()
    creator = subprocess.Popen([sys.executable, "-c", _CREATE_AND_WAIT, prefix], stdout=subprocess.PIPE, text=True)
    try:
        name = creator.stdout.readline().strip() if creator.stdout else ""
        assert shm.segments_of(prefix) == [name]
        assert shm.reap_orphans(prefix) == []  # its creator still runs
    finally:
        os.kill(creator.pid, signal.SIGKILL)
        creator.wait(timeout=30)
    shm.reap_orphans(prefix)
    assert shm.segments_of(prefix) == []


def test_the_reaper_judges_only_its_prefix_and_pid_namespace(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    pidns = shm.owner_of(shm.new_segment_name("x"))
    assert pidns is not None
    mine_dead = f"own.{pidns.pid_namespace}.{dead.pid}.0.{'a' * 16}"
    mine_alive = shm.new_segment_name("own")
    other_prefix = f"other.{pidns.pid_namespace}.{dead.pid}.0.{'b' * 16}"
    other_namespace = f"own.{pidns.pid_namespace + 1}.{dead.pid}.0.{'c' * 16}"
    for name in (mine_dead, mine_alive, other_prefix, other_namespace, "unrelated-file"):
        (tmp_path / name).write_bytes(b"x")
    assert shm.reap_orphans("own", shm_dir=tmp_path) == [mine_dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [mine_alive, other_prefix, other_namespace, "unrelated-file"])


def test_attach_refuses_names_it_did_not_make_and_missing_segments() -> None:
    with pytest.raises(ValueError):
        shm.attach("../../etc/passwd")
    with pytest.raises(FileNotFoundError):
        shm.attach(shm.new_segment_name("missing"))
    with pytest.raises(ValueError):
        shm.check_prefix("Bad Prefix")
    with pytest.raises(ValueError):
        shm.create("fine", 0)


def test_host_identity_is_stable_within_a_host() -> None:
    assert shm.host_identity() == shm.host_identity()
    out = subprocess.run([sys.executable, "-c", "from services.common import shm; print(shm.host_identity())"],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == shm.host_identity()


def _resident_bytes(segment: shm.SharedMemory) -> int:
    """Rss of this process's mapping of `segment` (its pages mapped into the process)."""
    import ctypes

    start = ctypes.addressof(ctypes.c_char.from_buffer(segment._mmap))  # type: ignore[attr-defined]
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for index, line in enumerate(lines):
        if line.split("-", 1)[0] == f"{start:x}":
            return next(int(row.split()[1]) * 1024 for row in lines[index:] if row.startswith("Rss:"))
    raise AssertionError("the segment's mapping is not in /proc/self/smaps")


def _populate_supported() -> bool:
    import mmap

    probe = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        probe.madvise(shm.MADV_POPULATE_WRITE, 0, mmap.PAGESIZE)
        return True
    except OSError:
        return False
    finally:
        probe.close()


@pytest.mark.skipif(not _populate_supported(), reason="the kernel has no MADV_POPULATE_WRITE (Linux < 5.14)")
def test_a_reserved_transfer_segment_is_mapped_before_its_first_write() -> None:
    """The shm transport's writer maps its segment's pages when it reserves them, while the forward
    pass runs, so writing the chunks later takes no page fault per 4 KB page."""
    from services.common.kv_codec import KvLayout
    from services.common.kv_shm import ShmTransferWriter

    layout = KvLayout(f"r-{uuid.uuid4().hex[:8]}", "fp", 2, 2, 64, 100, 16, 1, "float32")
    writer = ShmTransferWriter.create(f"test-{uuid.uuid4().hex[:8]}", layout, reserve=False)
    try:
        segment = writer._segment
        assert segment is not None and _resident_bytes(segment) == 0
        writer.reserve()
        assert _resident_bytes(segment) == -(-segment.size // 4096) * 4096
    finally:
        writer.destroy()
    shm.map_for_writing(segment)  # a closed mapping: nothing to do, no error


@pytest.mark.skipif(not _populate_supported(), reason="the kernel has no MADV_POPULATE_WRITE (Linux < 5.14)")
def test_mapping_a_segment_leaves_the_gil_to_other_threads() -> None:
    """The prefill maps a transfer's segment in a worker thread so its event loop goes on meanwhile:
    the mapping must not hold the GIL (mmap.madvise does, for the whole ~50 ms of 94 MB)."""
    import threading
    import time

    segment = shm.create(f"test-{uuid.uuid4().hex[:8]}", 256 << 20, reserve=True)
    took: list[float] = []

    def map_it() -> None:
        started = time.perf_counter()
        shm.map_for_writing(segment)
        took.append(time.perf_counter() - started)

    try:
        mapper = threading.Thread(target=map_it)
        longest_gap, last = 0.0, time.perf_counter()
        mapper.start()
        while mapper.is_alive():  # this thread keeps running Python while the other one maps
            now = time.perf_counter()
            longest_gap, last = max(longest_gap, now - last), now
        mapper.join()
        assert _resident_bytes(segment) == segment.size
        if took[0] < 0.02:
            pytest.skip(f"mapping took {took[0] * 1e3:.1f} ms: too short to tell who held the GIL")
        assert longest_gap < took[0] / 2, f"this thread stalled {longest_gap * 1e3:.0f} ms of {took[0] * 1e3:.0f}"
    finally:
        shm.destroy(segment)


def test_an_fp8_transfers_segment_holds_one_byte_a_value() -> None:
    """fp8 chunks are one byte a value (their scales travel inline): a segment sized for float32
    would reserve and map four times the memory."""
    from services.common.kv_codec import KvLayout
    from services.common.kv_shm import HEADER_BYTES, segment_bytes

    raw = KvLayout("r", "fp", 30, 3, 64, 2048, 512, 4, "float32")
    fp8 = KvLayout("r", "fp", 30, 3, 64, 2048, 512, 4, "float32", "fp8")
    values = 30 * 2 * 3 * 2048 * 64
    assert values <= segment_bytes(fp8) - HEADER_BYTES < values + 64 * fp8.chunk_count
    assert 4 * values <= segment_bytes(raw) - HEADER_BYTES < 4 * values + 64 * raw.chunk_count
