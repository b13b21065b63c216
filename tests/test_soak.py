"""The short version of `make soak`: 16 streams for 12 s against a local stack of the tiny model
(a small decode pool, so sequences are preempted too), with random lengths, client cancels and
bad requests mixed in: nothing leaks, nothing hangs, no error comes that was not asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_short_soak_leaks_nothing_and_hangs_nothing() -> None:
    result = subprocess.run([sys.executable, "-m", "services.bench.soak", "--model", "tiny", "--streams", "16",
                             "--seconds", "12", "--kv-pool-blocks", "40", "--request-timeout", "120", "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=280)
    report = json.loads(result.stdout)
    assert result.returncode == 0, (report, result.stderr[-2000:])
    assert (report["unexpected"], report["hung"]) == (0, 0), report
    assert not any(report["leftover"].values()), report
    assert report["completed"] > 0 and report["cancelled"] > 0 and report["refused_as_bad"] > 0, report
