"""Small C sources of this project, compiled on the machine that runs them.

A worker builds each at its start with the C compiler there (`$CC`, else `cc`; well under a
second) into the model cache directory, under a name that hashes the source, the command and the
CPU, so a changed source or another CPU builds anew, and loads it with ctypes (whose calls leave
the GIL to other threads). Callers fall back to their torch or Python path where it cannot be
built; the string `compiled` returns then says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
PORTABLE_FLAGS = ("-O3", "-shared", "-fPIC")  # where the CPU cannot be identified: runs on any of its kind
BUILD_SECONDS = 120.0
CPUINFO = Path("/proc/cpuinfo")


def compiled(source: Path, name: str, defines: Sequence[str], cache_dir: Path,
             flags: Sequence[str] = ()) -> ctypes.CDLL | str:
    """The loaded library of `source` compiled with `defines` (-D arguments) and `flags` (more
    compiler arguments), built first unless the cache holds it (one that cannot be loaded, cut
    short by a crash, is built again); a string says why not."""
    compiler = shlex.split(os.environ.get("CC", "cc")) or ["cc"]  # `ccache gcc` works too
    found = shutil.which(compiler[0])
    if found is None:
        return f"no C compiler ({compiler[0]!r} is not on PATH)"
    cpu = _cpu_identity()
    command = [found, *compiler[1:], *(FLAGS if cpu else PORTABLE_FLAGS), *flags,
               *(f"-D{define}" for define in defines)]
    key = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join(command).encode(), platform.machine().encode(),
                                     cpu]))  # the architecture even where the CPU is unknown: portable builds differ
    target = cache_dir / "native" / f"{name}-{key.hexdigest()[:16]}.so"
    try:
        if target.exists():
            try:
                return ctypes.CDLL(str(target))
            except OSError as error:
                log.warning("rebuilding %s, which cannot be loaded: %s", target, error)
        _build(command, source, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        return f"building it failed: {error}"


def _build(command: list[str], source: Path, target: Path) -> None:
    """Compile into a temporary file beside `target`, then rename: workers starting at once never
    load a half-written library, and a crash leaves none under the final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(descriptor)
    try:
        done = subprocess.run([*command, "-o", partial, str(source)], capture_output=True, text=True,
                              timeout=BUILD_SECONDS, check=False)
        if done.returncode:
            raise OSError(f"{command[0]} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(partial, 0o755)  # mkstemp's 0600: other users sharing the cache load it too
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _cpu_identity() -> bytes:
    """What -march=native compiles for: the CPU's model and flags (a library built for one CPU may
    not run on another, and a cache directory may be shared between hosts); empty where they
    cannot be read, and then the build is portable."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        text = ""
    lines = [line for line in text.splitlines()
             if line.lower().startswith(("model name", "flags", "features", "cpu part", "vendor_id"))]
    return "\n".join([platform.machine(), platform.processor(), *sorted(set(lines))]).encode() if lines else b""
