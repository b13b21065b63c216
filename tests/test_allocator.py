"""glibc's malloc thresholds (services.common.allocator): set in a fresh process, left alone where
the operator set them."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

_CALL = "from services.common.allocator import tune_allocator; print(tune_allocator())"
pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


def _tuned(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", _CALL], env={**clean, **env}, capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout.strip()


def test_the_thresholds_are_set_in_a_fresh_process() -> None:
    assert _tuned() == "True"


@pytest.mark.parametrize("setting", ["GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"])
def test_an_operators_malloc_setting_wins(setting: str) -> None:
    value = "glibc.malloc.check=0" if setting == "GLIBC_TUNABLES" else "1048576"
    assert _tuned(**{setting: value}) == "False"
