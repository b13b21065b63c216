"""The one-pass KV ingest (services/common/kv_ingest.c): a raw chunk's CRC-32C, finiteness check and
pool write in one native pass give exactly what the three Python passes give: the same checksum
as google_crc32c, every NaN and infinity found, the same pool bits; a chunk that fails a check is
DATA_LOSS through the assembler; anything outside the pool is refused before the pass runs."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import google_crc32c
import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import InternalFailure, KvCorrupted
from services.common import kv_fp8
from services.common.kv_codec import FP8_ENCODING, RAW_ENCODING, KvLayout, encode_chunk, tensor_bytes
from services.common.kv_assembly import AssemblyLimits, KvAssembler
from services.common import kv_ingest
from services.common.kv_ingest import NativeIngest
from services.common import native_build
from services.common.model_files import default_cache_dir
from services.common.runtime import ModelGeometry
from services.decode.blocks import BlockManager, LeaseRevoked, LeasedWriter
from services.decode.pool import BlockPool, PoolConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def ingest() -> NativeIngest:
    built = NativeIngest.build(default_cache_dir(), "native")
    assert built is not None
    return built


def geometry(dtype: str = "float32", layers: int = 3, heads: int = 2, head_dim: int = 8) -> ModelGeometry:
    return ModelGeometry("m", "fp", dtype, layers, heads, head_dim, 4096, frozenset(), 100)


def assemble(geo: ModelGeometry, pool: BlockPool, tokens: int, chunk_tokens: int, floor: int = 0,
             seed: int = 0, encoding: str = RAW_ENCODING) -> list[int]:
    """A random transfer of `tokens` tokens through a KvAssembler into `pool`; the block table."""
    manager = BlockManager(PoolConfig(pool.keys[0].shape[0], pool.block_size))
    lease = manager.allocate("r", tokens)
    keys, values = torch.randn(2, geo.num_layers, geo.num_kv_heads, tokens, geo.head_dim,
                               generator=torch.Generator().manual_seed(seed)).to(DTYPES[geo.dtype])
    layout = KvLayout("r", "fp", geo.num_layers, geo.num_kv_heads, geo.head_dim, tokens, chunk_tokens,
                      2, geo.dtype, encoding)
    assembler = KvAssembler("r", geo, tokens, AssemblyLimits(2**26), LeasedWriter(pool, manager, lease, floor))
    assembler.accept_layout(layout)
    for group in range(layout.layer_groups):
        layers = slice(group * 2, group * 2 + 2)
        for index in layout.group_chunks(group):
            assembler.accept_chunk(encode_chunk(layout, index, keys[layers], values[layers]))
    return manager.table("r")


@pytest.mark.parametrize(("dtype", "encoding"), [(d, RAW_ENCODING) for d in DTYPES] + [("float32", FP8_ENCODING)])
@pytest.mark.parametrize(("tokens", "chunk_tokens", "floor"), [(1, 4, 0), (37, 16, 0), (64, 32, 20), (50, 7, 16)])
def test_one_pass_writes_the_pool_bits_of_the_three_pass_path(ingest: NativeIngest, dtype: str, encoding: str,
                                                             tokens: int, chunk_tokens: int, floor: int) -> None:
    geo = geometry(dtype)
    config = PoolConfig(16, 4)
    native = BlockPool(config, geo, torch.device("cpu"), ingest)
    python = BlockPool(config, geo, torch.device("cpu"))
    assert native.can_ingest(encoding == FP8_ENCODING)
    assert (assemble(geo, native, tokens, chunk_tokens, floor, encoding=encoding)
            == assemble(geo, python, tokens, chunk_tokens, floor, encoding=encoding))
    for ours, theirs in zip([*native.keys, *native.values], [*python.keys, *python.values], strict=True):
        assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))
    assert any(bool(layer.any()) for layer in native.keys)


@settings(max_examples=60, deadline=None)
@given(layers=st.integers(1, 3), heads=st.integers(1, 4), tokens=st.integers(1, 40), head_dim=st.integers(1, 20),
       dtype=st.sampled_from(list(DTYPES)), seed=st.integers(0, 2**16))
def test_checksum_is_the_crc32c_of_the_bytes_in_order(layers: int, heads: int, tokens: int, head_dim: int,
                                                      dtype: str, seed: int) -> None:
    """Any shape: three interleaved streams, odd row sizes and short chunks combine to the CRC-32C."""
    ingest = NativeIngest.build(default_cache_dir(), "native")
    assert ingest is not None
    chunk = torch.randn(layers, 2, heads, tokens, head_dim, generator=torch.Generator().manual_seed(seed))
    data = tensor_bytes(chunk.to(DTYPES[dtype]))
    pools = [(torch.zeros(1, tokens, heads, head_dim, dtype=DTYPES[dtype]),) * 2 for _ in range(layers)]
    rows = numpy.full(tokens, -1, dtype=numpy.int64)
    assert ingest.ingest(data, tuple(chunk.shape), pools, rows, True).crc32c == google_crc32c.value(data)


@pytest.fixture(scope="module")
def three_streams(tmp_path_factory: pytest.TempPathFactory) -> NativeIngest:
    """The pass built without folding (KV_INGEST_NO_FOLD): the CRC instruction in three streams, as
    on a CPU without 512-bit carry-less multiplication."""
    built = native_build.compiled(kv_ingest.SOURCE, "kv_ingest", ["KV_INGEST_NO_FOLD"],
                                  tmp_path_factory.mktemp("no-fold"))
    assert not isinstance(built, str), built
    return NativeIngest(built)


@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 4), tokens=st.integers(1, 300), head_dim=st.sampled_from([1, 3, 16, 64]),
       dtype=st.sampled_from(list(DTYPES)), before=st.integers(0, 2**32 - 1), seed=st.integers(0, 2**16))
def test_both_checksum_paths_continue_any_crc_over_any_length(ingest: NativeIngest, three_streams: NativeIngest,
                                                              layers: int, tokens: int, head_dim: int, dtype: str,
                                                              before: int, seed: int) -> None:
    """Folding (where the CPU has VPCLMULQDQ and AVX-512) and the CRC instruction's three streams
    both give the CRC-32C of the bytes before (`crc`) followed by the chunk's, for chunks from a
    few bytes to many 256-byte fold steps with a tail, and write the same pool bits."""
    chunk = torch.randn(layers, 2, 3, tokens, head_dim, generator=torch.Generator().manual_seed(seed))
    data = tensor_bytes(chunk.to(DTYPES[dtype]))
    rows = numpy.arange(tokens, dtype=numpy.int64)
    written = []
    for built in (ingest, three_streams):
        pools = [(torch.zeros(1, tokens, 3, head_dim, dtype=DTYPES[dtype]),
                  torch.zeros(1, tokens, 3, head_dim, dtype=DTYPES[dtype])) for _ in range(layers)]
        verdict = built.ingest(data, tuple(chunk.shape), pools, rows, True, crc=before)
        assert verdict.crc32c == google_crc32c.extend(before, data) and verdict.finite
        written.append(torch.cat([t.flatten() for pair in pools for t in pair]))
    assert torch.equal(written[0], chunk.to(DTYPES[dtype]).transpose(2, 3).flatten())  # rows [tokens, heads, dim]
    assert torch.equal(written[0], written[1])


def test_the_pass_folds_its_checksum_where_the_cpu_can(ingest: NativeIngest, three_streams: NativeIngest) -> None:
    flags = set(" ".join(line for line in native_build.CPUINFO.read_text().splitlines()
                         if line.startswith("flags")).split())
    assert ingest.folds == ({"avx512f", "vpclmulqdq", "sse4_2"} <= flags)
    assert not three_streams.folds


def test_a_prepared_pass_run_layer_by_layer_equals_one_run(ingest: NativeIngest) -> None:
    """The decode checks a chunk once and runs its pass a layer at a time (under the lease's lock):
    chaining the layers' checksums gives the chunk's, and the pool bits are the same."""
    chunk = torch.randn(3, 2, 2, 37, 16)
    data = tensor_bytes(chunk)
    rows = numpy.arange(37, dtype=numpy.int64)
    whole = [(torch.zeros(1, 37, 2, 16), torch.zeros(1, 37, 2, 16)) for _ in range(3)]
    parts = [(torch.zeros(1, 37, 2, 16), torch.zeros(1, 37, 2, 16)) for _ in range(3)]
    expected = ingest.ingest(data, tuple(chunk.shape), whole, rows, True)
    call, crc = ingest.prepare(data, tuple(chunk.shape), parts, rows, True), 0
    for layer in range(3):
        crc = call.run(layer, layer + 1, crc).crc32c
    assert crc == expected.crc32c == google_crc32c.value(data)
    assert all(torch.equal(a, b) for pa, pb in zip(whole, parts, strict=True) for a, b in zip(pa, pb, strict=True))
    with pytest.raises(InternalFailure, match="layers"):
        call.run(2, 4)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 777, -1])
def test_every_non_finite_value_is_found(ingest: NativeIngest, dtype: str, poison: float, where: int) -> None:
    chunk = torch.randn(2, 2, 3, 21, 16).to(DTYPES[dtype])
    pools = [(torch.zeros(2, 16, 3, 16, dtype=DTYPES[dtype]),) * 2 for _ in range(2)]
    rows = numpy.arange(21, dtype=numpy.int64)
    assert ingest.ingest(tensor_bytes(chunk), tuple(chunk.shape), pools, rows, True).finite
    chunk.view(-1)[where] = poison
    assert not ingest.ingest(tensor_bytes(chunk), tuple(chunk.shape), pools, rows, True).finite
    assert ingest.ingest(tensor_bytes(chunk), tuple(chunk.shape), pools, rows, False).finite  # the check is off


@pytest.mark.parametrize(("corrupt", "phrase"), [("flip", "CRC-32C"), ("nan", "not finite")])
def test_a_chunk_failing_a_check_is_refused_by_the_assembler(ingest: NativeIngest, corrupt: str,
                                                             phrase: str) -> None:
    geo = geometry()
    pool = BlockPool(PoolConfig(8, 4), geo, torch.device("cpu"), ingest)
    manager = BlockManager(PoolConfig(8, 4))
    layout = KvLayout("r", "fp", 3, 2, 8, 8, 8, 3, "float32")
    keys, values = torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8)
    if corrupt == "nan":
        values[1, 1, 5, 2] = float("nan")
    chunk = encode_chunk(layout, 0, keys, values)
    if corrupt == "flip":
        chunk = dataclasses.replace(chunk, data=bytes([chunk.data[0] ^ 1]) + chunk.data[1:])
    assembler = KvAssembler("r", geo, 8, AssemblyLimits(2**20), LeasedWriter(pool, manager, manager.allocate("r", 8)))
    assembler.accept_layout(layout)
    with pytest.raises(KvCorrupted, match=phrase):
        assembler.accept_chunk(chunk)
    assert assembler.bytes_received == 0


def test_every_fp8_code_dequantizes_to_torchs_float32(ingest: NativeIngest) -> None:
    """All 256 e4m3 codes (subnormals, both zeros, the NaN codes) times a scale, bit for bit, and a
    NaN code or an overflowing product is not finite."""
    codes = torch.arange(256, dtype=torch.uint8).view(1, 2, 1, 8, 16)
    scales = numpy.array([0.37, 3.0], dtype=numpy.float32).tobytes()
    pools = [(torch.zeros(1, 8, 1, 16), torch.zeros(1, 8, 1, 16))]
    rows = numpy.arange(8, dtype=numpy.int64)
    verdict = ingest.ingest(codes.numpy().tobytes(), (1, 2, 1, 8, 16), pools, rows, True, scales)
    expected = kv_fp8.dequantize(codes.numpy().tobytes(), scales, (1, 2, 1, 8, 16), torch.float32, "chunk")
    for kv in range(2):
        assert torch.equal(pools[0][kv][0, :, 0].view(torch.int32), expected[0, kv, 0].view(torch.int32))
    assert not verdict.finite  # 0x7f and 0xff are NaN
    finite_codes = torch.full((1, 2, 1, 8, 16), 0x7E, dtype=torch.uint8)  # 448, the largest
    assert ingest.ingest(finite_codes.numpy().tobytes(), (1, 2, 1, 8, 16), pools, rows, True, scales).finite
    huge = numpy.array([1.0, 3e38], dtype=numpy.float32).tobytes()  # 448 * 3e38 overflows float32
    assert not ingest.ingest(finite_codes.numpy().tobytes(), (1, 2, 1, 8, 16), pools, rows, True, huge).finite


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_an_fp8_chunk_with_a_bad_scale_is_refused_by_the_assembler(ingest: NativeIngest, scale: float) -> None:
    geo = geometry()
    pool = BlockPool(PoolConfig(8, 4), geo, torch.device("cpu"), ingest)
    manager = BlockManager(PoolConfig(8, 4))
    layout = KvLayout("r", "fp", 3, 2, 8, 8, 8, 3, "float32", FP8_ENCODING)
    chunk = encode_chunk(layout, 0, torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8))
    scales = numpy.frombuffer(chunk.scales, numpy.float32).copy()
    scales[4] = scale
    bad = dataclasses.replace(chunk, scales=scales.tobytes(),
                              crc32c=google_crc32c.extend(google_crc32c.value(chunk.data), scales.tobytes()))
    assembler = KvAssembler("r", geo, 8, AssemblyLimits(2**20), LeasedWriter(pool, manager, manager.allocate("r", 8)))
    assembler.accept_layout(layout)
    with pytest.raises(KvCorrupted, match="scale"):
        assembler.accept_chunk(bad)


def test_an_fp8_chunk_into_a_float16_pool_takes_the_python_path(ingest: NativeIngest) -> None:
    geo = geometry("float16")
    native = BlockPool(PoolConfig(16, 4), geo, torch.device("cpu"), ingest)
    python = BlockPool(PoolConfig(16, 4), geo, torch.device("cpu"))
    assert not native.can_ingest(fp8=True)
    assemble(geo, native, 30, 16, encoding=FP8_ENCODING)
    assemble(geo, python, 30, 16, encoding=FP8_ENCODING)
    assert all(torch.equal(a, b) for a, b in zip(native.keys + native.values, python.keys + python.values, strict=True))


def test_a_revoked_lease_writes_nothing(ingest: NativeIngest) -> None:
    geo = geometry()
    pool = BlockPool(PoolConfig(8, 4), geo, torch.device("cpu"), ingest)
    manager = BlockManager(PoolConfig(8, 4))
    layout = KvLayout("r", "fp", 3, 2, 8, 8, 8, 3, "float32")
    writer = LeasedWriter(pool, manager, manager.allocate("r", 8))
    manager.renew("r")  # a newer transfer took over
    chunk = encode_chunk(layout, 0, torch.ones(3, 2, 8, 8), torch.ones(3, 2, 8, 8))
    with pytest.raises(LeaseRevoked):
        writer.store_unverified(chunk.span, chunk.data, chunk.shape, True)
    assert not any(bool(layer.any()) for layer in [*pool.keys, *pool.values])


def test_a_chunk_is_written_a_layer_at_a_time_under_its_lease(ingest: NativeIngest) -> None:
    """The lease's lock is held for one layer's pass at a time, as the Python path's writes hold it,
    so a `free` or `renew` on the event loop never waits for a whole chunk; a lease revoked between
    layers stops the rest."""
    geo = geometry()
    pool = BlockPool(PoolConfig(8, 4), geo, torch.device("cpu"), ingest)
    manager = BlockManager(PoolConfig(8, 4))
    writer = LeasedWriter(pool, manager, manager.allocate("r", 8))
    holds = manager.writing

    @contextlib.contextmanager
    def writing(lease):  # type: ignore[no-untyped-def]
        with holds(lease) as table:
            yield table
        manager.renew("r")  # a newer transfer takes over once the first layer is written

    manager.writing = writing  # type: ignore[method-assign]
    layout = KvLayout("r", "fp", 3, 2, 8, 8, 8, 3, "float32")
    chunk = encode_chunk(layout, 0, torch.ones(3, 2, 8, 8), torch.ones(3, 2, 8, 8))
    with pytest.raises(LeaseRevoked):
        writer.store_unverified(chunk.span, chunk.data, chunk.shape, True)
    assert bool(pool.keys[0].any()) and not any(bool(t.any()) for t in pool.keys[1:] + pool.values[1:])


def test_rows_or_bytes_outside_the_pool_are_refused_before_the_pass(ingest: NativeIngest) -> None:
    pools = [(torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 3, 8))]
    data = tensor_bytes(torch.ones(1, 2, 3, 5, 8))
    good = numpy.arange(5, dtype=numpy.int64)
    for rows in (numpy.array([0, 1, 2, 3, 8]), numpy.array([-2, 0, 1, 2, 3]), good[:4], good.astype(numpy.int32)):
        with pytest.raises(InternalFailure, match="outside the pool"):
            ingest.ingest(data, (1, 2, 3, 5, 8), pools, numpy.asarray(rows), True)
    with pytest.raises(InternalFailure, match="bytes"):
        ingest.ingest(data[:-4], (1, 2, 3, 5, 8), pools, good, True)
    with pytest.raises(InternalFailure, match="laid out"):
        ingest.ingest(data, (1, 2, 3, 5, 8), [(pools[0][0], torch.zeros(2, 4, 3, 8, dtype=torch.float16))], good, True)
    with pytest.raises(InternalFailure, match="pool tensors"):
        ingest.ingest(data, (2, 2, 3, 5, 8), pools, good, True)
    assert not any(bool(t.any()) for t in pools[0])


def test_modes_python_and_no_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert NativeIngest.build(tmp_path, "python") is None
    monkeypatch.setenv("CC", "no-such-compiler")
    assert NativeIngest.build(tmp_path, "auto") is None  # the Python path runs
    with pytest.raises(ValueError, match="no C compiler"):
        NativeIngest.build(tmp_path, "native")
    with pytest.raises(ValueError, match="kv_ingest"):
        NativeIngest.build(tmp_path, "fast")


def test_where_the_cpu_cannot_be_identified_the_build_is_portable(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A library compiled for this CPU (-march=native) could crash another host sharing the cache
    with an illegal instruction; without /proc/cpuinfo the build targets any CPU of the architecture
    (here: the CRC without its hardware instruction), and still computes the same checksum."""
    native = NativeIngest.build(tmp_path, "native")
    monkeypatch.setattr(native_build, "CPUINFO", tmp_path / "no-cpuinfo")
    portable = NativeIngest.build(tmp_path, "native")
    assert native is not None and portable is not None
    assert len(list((tmp_path / "native").glob("kv_ingest-*.so"))) == 2  # two builds, two cache keys
    data = tensor_bytes(torch.randn(2, 2, 3, 17, 8))
    pools = [(torch.zeros(2, 16, 3, 8), torch.zeros(2, 16, 3, 8))] * 2
    rows = numpy.arange(17, dtype=numpy.int64)
    assert portable.ingest(data, (2, 2, 3, 17, 8), pools, rows, True).crc32c == google_crc32c.value(data)


def test_an_fp8_chunk_of_a_head_size_the_pass_does_not_take_goes_the_python_way(ingest: NativeIngest) -> None:
    geo = geometry(layers=1, heads=1, head_dim=1032)  # over the pass's 1,024 fp8 values a row
    native = BlockPool(PoolConfig(4, 4), geo, torch.device("cpu"), ingest)
    python = BlockPool(PoolConfig(4, 4), geo, torch.device("cpu"))
    assert native.can_ingest(fp8=False) and not native.can_ingest(fp8=True)
    assemble(geo, native, 6, 4, encoding=FP8_ENCODING)
    assemble(geo, python, 6, 4, encoding=FP8_ENCODING)
    assert torch.equal(native.keys[0], python.keys[0]) and torch.equal(native.values[0], python.values[0])


def test_portable_builds_for_other_architectures_get_their_own_cache_files(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Hosts of two architectures sharing a cache, neither able to read /proc/cpuinfo, never load
    (and rebuild over) each other's library."""
    monkeypatch.setattr(native_build, "CPUINFO", tmp_path / "no-cpuinfo")
    assert NativeIngest.build(tmp_path, "native") is not None
    monkeypatch.setattr(native_build.platform, "machine", lambda: "some-other-architecture")
    assert NativeIngest.build(tmp_path, "native") is not None
    assert len(list((tmp_path / "native").glob("kv_ingest-*.so"))) == 2
