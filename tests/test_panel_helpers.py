"""Idle cores helping a batched step's products (exact_gemv.c's shared_panels_run, through
PanelKernel.helped_by): the helped products are the kernel's alone, bit for bit, for every row
count, output width and k blocking a step or a decode's own prefill has, whether the helper's core
is idle (it computes part), busy with another process (the caller computes alone), or shared so
that helpers and caller preempt one another mid-block; rows beyond HELPED_ROWS are computed alone;
panels the pool was not started for are computed alone, views of its own are helped; a stopped
pool refuses products; a decode worker's install hands its pool to the batched steps' kernel."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch

from services.common.errors import InternalFailure
from services.common.model_files import default_cache_dir
from services.common.native_build import compiled
from services.common.packed_weights import PackedWeights
from services.decode import exact_gemv
from services.decode.exact_gemv import same_bits
from services.decode.gemv_helpers import HELPED_ROWS, GemvHelpers
from services.decode.panel_products import PanelKernel
from tests.gemv_helpers import built_kernel, needs_a_second_core

# (outputs, inputs): fused q/k/v, o, fused gate/up, down, a last panel part-filled, and too few
# outputs to share (one panel of 16 or 32: the caller alone)
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (4100, 576), (16, 576)]
ROWS = (1, 2, 5, 7, 16, 32, HELPED_ROWS, HELPED_ROWS + 1)
BLOCKS = (0, 192)  # one sum over k, and k in blocks of 192 (a prompt's order on some BLAS)

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


def _kernels() -> tuple[PanelKernel, PanelKernel]:
    """(one to be helped, one alone): the same compiled kernel."""
    built = [PanelKernel.build(default_cache_dir()) for _ in range(2)]
    assert all(isinstance(kernel, PanelKernel) for kernel in built), built
    return built[0], built[1]  # type: ignore[return-value]


def _panels(kernel: PanelKernel) -> list[tuple[torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(21)
    return [(kernel.pack(torch.randn(n, k, generator=generator)), n) for n, k in SHAPES]


def _helped(library: ctypes.CDLL, cores: list[int], kernel: PanelKernel,
            panels: list[tuple[torch.Tensor, int]]) -> GemvHelpers:
    helpers = GemvHelpers.start(library, cores, [], [packed for packed, _ in panels])
    assert isinstance(helpers, GemvHelpers), helpers
    kernel.helped_by(helpers)
    return helpers


def _products_match(helped: PanelKernel, alone: PanelKernel, panels: list[tuple[torch.Tensor, int]],
                    seed: int, rows: tuple[int, ...] = ROWS) -> None:
    generator = torch.Generator().manual_seed(seed)
    for packed, outputs in panels:
        for count in rows:
            x = torch.randn(count, packed.shape[1], generator=generator) * 10.0
            for block in BLOCKS:
                got = helped.product(x, packed, outputs, block)
                assert same_bits(got, alone.product(x, packed, outputs, block)), (outputs, count, block)


def _poisoned_products_match(helpers: GemvHelpers, alone: PanelKernel, panels: list[tuple[torch.Tensor, int]],
                             seed: int) -> None:
    """Straight through the pool into outputs filled with NaN: a block nobody wrote shows."""
    generator = torch.Generator().manual_seed(seed)
    for packed, outputs in panels:
        x = torch.randn(32, packed.shape[1], generator=generator)
        out = torch.full((32, outputs), float("nan"))
        assert helpers.panels_run(alone._columns, alone.width, x, packed, out, packed.shape[1])
        assert same_bits(out, alone.product(x, packed, outputs)), outputs


def test_batched_products_helped_by_an_idle_core_are_the_kernel_s_alone_and_the_helper_computes_part(
        cores: tuple[int, int]) -> None:
    helped, alone = _kernels()
    panels = _panels(alone)
    helpers = _helped(built_kernel().library, [cores[1]], helped, panels)
    try:
        deadline = time.monotonic() + 30  # a helper runs only in time its core has spare: other tests may load it
        seed = 0
        while True:
            _products_match(helped, alone, panels, seed)
            _poisoned_products_match(helpers, alone, panels, seed)
            seed += 1
            if helpers.counts()[0] > 0 or time.monotonic() > deadline:
                break
        assert helpers.counts()[0] > 0  # the helper computed blocks that the caller copied
        before = helpers.counts()
        _products_match(helped, alone, panels[:1], seed, rows=(HELPED_ROWS + 1,))
        assert helpers.counts() == before  # more rows than the pool's scratch holds: alone
    finally:
        helpers.stop()


_BUSY = "import time\ndeadline = time.monotonic() + 60\nwhile time.monotonic() < deadline: pass\n"


def test_batched_products_keep_their_bits_while_the_helper_s_core_is_busy(cores: tuple[int, int]) -> None:
    helped, alone = _kernels()
    panels = _panels(alone)
    helpers = _helped(built_kernel().library, [cores[1]], helped, panels)
    # a process at normal priority on the helper's core: the helper (SCHED_IDLE) barely runs there
    busy = subprocess.Popen([sys.executable, "-c", _BUSY], preexec_fn=lambda: os.sched_setaffinity(0, {cores[1]}))
    try:
        time.sleep(0.3)
        deadline = time.monotonic() + 30  # the scheduler may still hand the helper a slice now and then
        seed = 0
        while True:
            _products_match(helped, alone, panels, seed, rows=(16, 32))  # and they end: no waiting for a helper
            seed += 1
            if helpers.counts()[2] > 0 or time.monotonic() > deadline:
                break
        assert helpers.counts()[2] > 0  # the helper did too little: the caller went on alone for a while
    finally:
        busy.kill()
        busy.wait(timeout=10)
        helpers.stop()


def test_batched_products_with_helpers_preempted_mid_block_all_the_time_keep_their_bits(
        cores: tuple[int, int]) -> None:
    """Helpers at SCHED_OTHER, one on the caller's own core: caller and helpers preempt one another
    mid-block constantly, so blocks are stolen, dropped and copied in every order."""
    built = compiled(exact_gemv.SOURCE, "exact_gemv", ["PREFETCH_LOCALITY=1", "HELPER_POLICY=SCHED_OTHER"],
                     default_cache_dir(), flags=exact_gemv.BUILD_FLAGS)
    assert isinstance(built, ctypes.CDLL), built
    helped, alone = _kernels()
    panels = _panels(alone)
    helpers = _helped(built, [cores[0], cores[1]], helped, panels)
    try:
        for seed in range(3):
            _products_match(helped, alone, panels, seed)
            _poisoned_products_match(helpers, alone, panels, seed)
        helped_blocks, taken, _ = helpers.counts()
        assert helped_blocks > 0 and taken > 0
    finally:
        helpers.stop()


def test_panels_the_helpers_were_not_started_for_are_computed_alone_and_views_of_theirs_are_helped(
        cores: tuple[int, int]) -> None:
    helped, alone = _kernels()
    panels = _panels(alone)
    helpers = _helped(built_kernel().library, [cores[1]], helped, panels[:1])
    try:
        other, outputs = panels[1]  # panels a decode packed itself (a layer not lent): its own, alone
        x = torch.randn(8, other.shape[1], generator=torch.Generator().manual_seed(3))
        before = helpers.counts()
        assert same_bits(helped.product(x, other, outputs), alone.product(x, other, outputs))
        assert helpers.counts() == before  # no helper was handed them
        assert not helpers.panels_run(alone._columns, alone.width, x, other, torch.empty(8, outputs), 0)  # nor directly
        fused, _ = panels[0]  # a layer's panels within fused ones, as a decode's prefill borrows them
        view = fused[6:12]
        x = torch.randn(8, fused.shape[1], generator=torch.Generator().manual_seed(4))
        assert helpers.covers(view)
        assert same_bits(helped.product(x, view, 6 * alone.width), alone.product(x, view, 6 * alone.width))
    finally:
        helpers.stop()


def test_a_decode_s_install_hands_the_pool_to_the_panel_kernel_of_its_batched_steps(cores: tuple[int, int]) -> None:
    """`--gemv torch` (no layer of a stream alone replaced): the pool is started for the panels alone."""
    torch.manual_seed(5)
    model = torch.nn.Module()
    body = torch.nn.Module()
    layer = torch.nn.Module()
    layer.self_attn = torch.nn.Module()
    for name, (n, k) in {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64)}.items():
        setattr(layer.self_attn, name, torch.nn.Linear(k, n, bias=False))
    layer.mlp = torch.nn.Module()
    for name, (n, k) in {"gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}.items():
        setattr(layer.mlp, name, torch.nn.Linear(k, n, bias=False))
    body.layers = torch.nn.ModuleList([layer])
    model.model = body
    model.lm_head = torch.nn.Linear(64, 4096, bias=False)
    kernel, alone = _kernels()
    packed = PackedWeights.build(model, torch.device("cpu"), "batched", kernel)
    assert packed is not None
    installed = exact_gemv.install(model, default_cache_dir(), "torch", [cores[1]], packed)
    assert installed.layers == 0 and installed.helpers is not None
    helpers = installed.helpers
    try:
        head = packed.lm_head
        deadline = time.monotonic() + 30
        while True:  # the LM head's products go through the pool: its helper takes blocks
            x = torch.randn(16, 64)
            assert same_bits(head(x)[0], alone.product(x, head.weight, 4096))
            if helpers.counts()[0] + helpers.counts()[1] > 0 or time.monotonic() > deadline:
                break
        assert sum(helpers.counts()[:2]) > 0
    finally:
        helpers.stop()


def test_a_stopped_pool_refuses_products_instead_of_reading_freed_memory(cores: tuple[int, int]) -> None:
    helped, alone = _kernels()
    panels = _panels(alone)
    helpers = _helped(built_kernel().library, [cores[1]], helped, panels)
    helpers.stop()
    packed, outputs = panels[0]
    with pytest.raises(InternalFailure, match="stopped"):
        helped.product(torch.zeros(4, packed.shape[1]), packed, outputs)
