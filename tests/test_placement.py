"""CPU placement of the model workers: the settings, what `make up` (services.stack) passes, a real
process pinning its threads, and the warning about half precision without native support."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.common import placement
from services.common.config import parse_settings
from services.decode.settings import DecodeSettings
from services.stack import UNPLACED, WorkerPlacement, free_port, local_stack

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_lists_and_halves() -> None:
    assert placement.parse_cpu_list("0-2,5") == {0, 1, 2, 5}
    for bad in ("", "a", "3-1", "1,", "-2"):
        with pytest.raises(ValueError):
            placement.parse_cpu_list(bad)
    two, three, one = frozenset({0, 1}), frozenset({4, 5, 6}), frozenset({3})
    assert placement.resolve_cpus("first-half", two) == {0} and placement.resolve_cpus("second-half", two) == {1}
    assert placement.resolve_cpus("first-half", three) == {4, 5} and placement.resolve_cpus("second-half", three) == {6}
    assert placement.resolve_cpus("second-half", one) == {3} == placement.resolve_cpus("first-half", one)
    assert placement.resolve_cpus("", three) == three
    with pytest.raises(ValueError, match="may only use"):
        placement.resolve_cpus("0-1", three)


def test_threads_never_oversubscribe_the_owned_cores() -> None:
    assert placement.thread_count(0, frozenset({0, 1})) == 2
    assert placement.thread_count(1, frozenset({0, 1})) == 1
    assert placement.thread_count(8, frozenset({0, 1})) == 2


def test_worker_settings_validate_cpus() -> None:
    assert parse_settings(DecodeSettings, "d", "", ["--cpus", "first-half"], environ={}).cpus == "first-half"
    assert parse_settings(DecodeSettings, "d", "", [], environ={"WORKER_CPUS": "0-1"}).cpus == "0-1"
    with pytest.raises(ValueError, match="cpu list"):
        parse_settings(DecodeSettings, "d", "", ["--cpus", "half"], environ={})


def test_make_up_splits_the_cores_between_the_workers() -> None:
    ports = {name: free_port() for name in ("gateway", "prefill", "decode", "kvstore")}
    specs = {spec.name: spec for spec in local_stack(ports, "tiny", placement=WorkerPlacement())}
    for role, half in (("decode", "first-half"), ("prefill", "second-half")):
        args = specs[role].args
        assert args[args.index("--cpus") + 1] == half and args[args.index("--torch-threads") + 1] == "0"
        assert specs[role].env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in specs["gateway"].env and "--cpus" not in specs["gateway"].args
    unplaced = {spec.name: spec for spec in local_stack(ports, "tiny", placement=UNPLACED)}
    assert "OMP_WAIT_POLICY" not in unplaced["decode"].env
    with pytest.raises(ValueError):
        WorkerPlacement(decode_cpus="7-1")
    with pytest.raises(ValueError):
        WorkerPlacement(omp_wait_policy="sometimes")


_PINNED = """
import json, os, threading, torch
from services.common import placement
threading.Thread(target=lambda: __import__('time').sleep(3), daemon=True).start()  # started before pinning
cpus, threads = placement.apply(os.environ['SPEC'], 0)
tasks = {int(t): sorted(os.sched_getaffinity(int(t))) for t in os.listdir('/proc/self/task')}
print(json.dumps({"cpus": sorted(cpus), "threads": threads, "torch": torch.get_num_threads(), "tasks": tasks}))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_a_worker_pins_every_thread_and_runs_one_torch_thread_per_core() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    spec = "second-half" if len(allowed) > 1 else ""
    result = subprocess.run([sys.executable, "-c", _PINNED], cwd=ROOT, env={**os.environ, "SPEC": spec},
                            capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(result.stdout)
    expected = sorted(placement.resolve_cpus(spec, frozenset(allowed)))
    assert report["cpus"] == expected and report["threads"] == report["torch"] == len(expected)
    assert len(report["tasks"]) >= 2 and all(cpus == expected for cpus in report["tasks"].values())


@pytest.mark.skipif(placement.native_half(torch.bfloat16), reason="this CPU computes bfloat16 natively")
def test_bfloat16_without_native_support_is_warned_about_with_the_measured_cost(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="services.common.placement"):
        placement.check_dtype(torch.bfloat16, torch.device("cpu"))
    assert "the time of float32" in caplog.text and "bfloat16" in caplog.text
    caplog.clear()
    placement.check_dtype(torch.float32, torch.device("cpu"))
    assert not caplog.text
