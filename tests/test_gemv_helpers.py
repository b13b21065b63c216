"""Idle cores helping a batch of one's products (gemv_helpers.py, exact_gemv.c's shared_gemv):
the products keep the kernel's bits (F.linear's) whether the helper's core is idle, so that it
computes part of them, busy with another process, so that the caller computes them alone, or
shared with helpers that preempt one another and the caller mid-block; a second caller at the same
time computes alone; the pool refuses cores it cannot pin to and weights it was not started for,
and its threads end when it stops; the setting is validated and resolved to cores; the running
decode of the exactness tests' stack runs with a helper and counts its work in its metrics."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from services.common.errors import InternalFailure
from services.common.model_files import default_cache_dir
from services.common.native_build import compiled
from services.decode import exact_gemv
from services.decode.exact_gemv import same_bits
from services.decode.gemv_helpers import AUTO_HELPERS, GemvHelpers, check_setting, helper_cores
from tests.conftest import RunningStack
from tests.gemv_helpers import built_kernel, needs_a_second_core, needs_the_blas_order

# (rows, columns): the model's shapes (q/o, k/v, gate/up, down, a slice of the LM head), rows not a
# multiple of a block (32), and too few rows to share (the caller alone)
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 576), (100, 576), (36, 64)]

pytestmark = needs_a_second_core


@pytest.fixture
def cores() -> Iterator[tuple[int, int]]:
    """(this thread's core, the helper's): this thread is pinned to the first for the test."""
    allowed = os.sched_getaffinity(0)
    mine, other = sorted(allowed)[:2]
    os.sched_setaffinity(0, {mine})
    try:
        yield mine, other
    finally:
        os.sched_setaffinity(0, allowed)


def _weights() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randn(rows, columns, generator=generator) for rows, columns in SHAPES]


def _helped_products_match(helpers: GemvHelpers, weights: list[torch.Tensor], rounds: int, seed: int = 12) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        for weight in weights:
            x = torch.randn(weight.shape[1], generator=generator) * 10.0
            out = torch.full((weight.shape[0],), float("nan"))
            helpers.run((weight.data_ptr(), *weight.shape, weight.stride(0)), x.data_ptr(), out.data_ptr())
            assert same_bits(out, F.linear(x[None], weight)[0]), weight.shape


@needs_the_blas_order
def test_products_helped_by_an_idle_core_have_f_linear_s_bits_and_the_helper_computes_part(
        cores: tuple[int, int]) -> None:
    weights = _weights()
    helpers = GemvHelpers.start(built_kernel().library, [cores[1]], weights)
    assert isinstance(helpers, GemvHelpers), helpers
    try:
        deadline = time.monotonic() + 30  # a helper runs only in time its core has spare: other tests may load it
        while True:
            _helped_products_match(helpers, weights, 10)
            if helpers.counts()[0] > 0 or time.monotonic() > deadline:
                break
        assert helpers.counts()[0] > 0  # the helper computed blocks that the caller copied
    finally:
        helpers.stop()


_BUSY = "import time\ndeadline = time.monotonic() + 60\nwhile time.monotonic() < deadline: pass\n"


@needs_the_blas_order
def test_products_keep_their_bits_while_the_helper_s_core_is_busy(cores: tuple[int, int]) -> None:
    weights = _weights()
    helpers = GemvHelpers.start(built_kernel().library, [cores[1]], weights)
    assert isinstance(helpers, GemvHelpers), helpers
    # a process at normal priority on the helper's core: the helper (SCHED_IDLE) barely runs there
    busy = subprocess.Popen([sys.executable, "-c", _BUSY], preexec_fn=lambda: os.sched_setaffinity(0, {cores[1]}))
    try:
        time.sleep(0.3)
        deadline = time.monotonic() + 30  # the scheduler may still hand the helper a slice now and then
        while True:
            _helped_products_match(helpers, weights, 20)  # and they end: the caller waits for no helper
            if helpers.counts()[2] > 0 or time.monotonic() > deadline:
                break
        assert helpers.counts()[2] > 0  # the helper did too little: the caller went on alone for a while
    finally:
        busy.kill()
        busy.wait(timeout=10)
        helpers.stop()


@needs_the_blas_order
def test_helpers_preempted_mid_block_all_the_time_leave_the_bits_alone(cores: tuple[int, int]) -> None:
    """Helpers at SCHED_OTHER, one on the caller's own core: caller and helpers preempt one another
    mid-block constantly, so blocks are stolen, dropped and copied in every order."""
    built = compiled(exact_gemv.SOURCE, "exact_gemv", ["PREFETCH_LOCALITY=1", "HELPER_POLICY=SCHED_OTHER"],
                     default_cache_dir(), flags=exact_gemv.BUILD_FLAGS)
    assert isinstance(built, ctypes.CDLL), built
    weights = _weights()
    helpers = GemvHelpers.start(built, [cores[0], cores[1]], weights)
    assert isinstance(helpers, GemvHelpers), helpers
    try:
        for seed in range(8):
            _helped_products_match(helpers, weights, 10, seed)
        helped, taken, _ = helpers.counts()
        assert helped > 0 and taken > 0
    finally:
        helpers.stop()


@needs_the_blas_order
def test_a_second_caller_at_the_same_time_computes_alone_with_the_same_bits(cores: tuple[int, int]) -> None:
    weights = _weights()
    helpers = GemvHelpers.start(built_kernel().library, [cores[1]], weights)
    assert isinstance(helpers, GemvHelpers), helpers
    try:
        with ThreadPoolExecutor(2) as callers:  # ctypes leaves the GIL: both products run at once
            for done in [callers.submit(_helped_products_match, helpers, weights, 15, seed) for seed in (1, 2)]:
                done.result(timeout=120)
    finally:
        helpers.stop()


def test_a_weight_the_helpers_were_not_started_for_is_refused(cores: tuple[int, int]) -> None:
    weights = _weights()
    helpers = GemvHelpers.start(built_kernel().library, [cores[1]], weights[:1])
    assert isinstance(helpers, GemvHelpers), helpers
    try:
        other, x, out = weights[1], torch.zeros(weights[1].shape[1]), torch.zeros(weights[1].shape[0])
        with pytest.raises(InternalFailure, match="not started for"):
            helpers.run((other.data_ptr(), *other.shape, other.stride(0)), x.data_ptr(), out.data_ptr())
    finally:
        helpers.stop()


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_a_stopped_pool_s_threads_end_and_cores_out_of_reach_are_refused(cores: tuple[int, int]) -> None:
    library = built_kernel().library
    before = _threads()
    helpers = GemvHelpers.start(library, [cores[1], cores[1]], _weights())
    assert isinstance(helpers, GemvHelpers) and _threads() == before + 2
    helpers.stop()
    assert _threads() == before
    helpers.stop()  # once only: a second stop does nothing
    refused = GemvHelpers.start(library, [(os.cpu_count() or 1) + 1000], _weights())
    assert isinstance(refused, str) and "could not start" in refused and _threads() == before
    assert GemvHelpers.start(library, list(range(9)), _weights()) == "at most 8 helpers"


def test_the_setting_is_validated_and_names_cores() -> None:
    for good in ("auto", "off", "1", "0-3,6"):
        check_setting(good)
    for bad in ("on", "3-1", "0-8", ""):
        with pytest.raises(ValueError, match="gemv_helpers must be auto, off or a cpu list"):
            check_setting(bad)
    spare = frozenset({9, 1, 5, 7, 3})
    assert helper_cores("auto", spare) == [1, 3, 5][:AUTO_HELPERS]
    assert helper_cores("auto", frozenset()) == []  # a worker without a placement owns every core
    assert helper_cores("off", spare) == [] and helper_cores("6,2", spare) == [2, 6]


@needs_the_blas_order
def test_the_running_decode_computes_a_stream_alone_with_a_helper(memory_stack: RunningStack) -> None:
    """The stack the greedy exactness tests run against (tests/test_exactness.py) has one."""
    assert memory_stack.stack.log_dir is not None
    log = (Path(memory_stack.stack.log_dir) / "decode.log").read_text()
    assert "the decode's products (a batch of one's and batched steps') are helped by threads on cores" in log
    port = memory_stack.metrics_ports["decode"]  # and shows their work
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for series in ('disagg_decode_helper_blocks_total{by="helper"}', 'disagg_decode_helper_blocks_total{by="decode"}',
                   "disagg_decode_helper_rests_total"):
        assert re.search(rf"^{re.escape(series)} \d", text, re.MULTILINE), series
