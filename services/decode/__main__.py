"""`python -m services.decode`: run a decode worker."""

from __future__ import annotations

from pathlib import Path

import grpc

from services.common.kv_assembly import AssemblyLimits
from services.common.kv_ingest import NativeIngest
from services.common.kvstore_client import KvStoreClient
from services.common.metrics import DecodeMetrics, HelperCollector, decode_load_gauges
from services.common.model_thread import ModelThread
from services.common.placement import allowed_cpus
from services.common.packed_weights import PackedWeights
from services.common.pb import decode_pb2
from services.common.server import Lifecycle, ServerSpec, run_service, serve
from services.common.shm import host_identity
from services.common.telemetry import service_telemetry
from services.common.tls_settings import tls_services
from services.common.worker import load_runtime
from services.decode.admission import AdmissionLimits
from services.decode import exact_gemv, one_stream, panel_products, prompt_products
from services.decode.gemv_helpers import helper_cores
from services.decode.native_attention import NativeAttention
from services.decode.paged_runner import check_layers
from services.decode.pool import PoolConfig
from services.decode.engine import DecodeEngine, DecodeLimits, FastPaths
from services.decode.servicer import DecodeServicer, add_to_server
from services.decode.settings import DecodeSettings

MB = 1024 * 1024


def decode_limits(settings: DecodeSettings) -> DecodeLimits:
    return DecodeLimits(
        kv_timeout_seconds=settings.kv_timeout_seconds,
        assembly=AssemblyLimits(int(settings.max_chunk_mb * MB), settings.check_kv_finite),
        admission=AdmissionLimits(settings.max_active_requests, settings.reject_threshold,
                                  settings.max_cache_budget_mb),
        max_batch_size=settings.max_batch_size, preempt_threshold=settings.preempt_threshold,
        step_timeout_seconds=settings.step_timeout_seconds, batch_invariant=settings.batch_invariant,
        prefix_cache=settings.prefix_cache == "on")


def one_stream_refusal(settings: DecodeSettings, packed: PackedWeights | None) -> str:
    """Why the settings keep a stream alone off the one-stream path ('' where they do not)."""
    if not settings.one_stream:
        return "--no-one-stream"
    if packed is not None and packed.for_one:
        return "a stream alone runs on the packed weights (--packed-weights all)"
    return ""


def packing_mode(settings: DecodeSettings) -> str:
    """What to pack: nothing for batch-invariant steps or when no step can hold two sequences."""
    if settings.batch_invariant or (settings.max_batch_size < 2 and settings.packed_weights == "batched"):
        return "off"
    return settings.packed_weights


def products_mode(settings: DecodeSettings) -> str:
    """Which kernel the packed weights are laid out for: oneDNN's (no timing at start) where nothing is packed."""
    return "onednn" if packing_mode(settings) == "off" else settings.batched_products


def attention_mode(settings: DecodeSettings) -> str:
    """How batched steps attend: batch-invariant steps attend per sequence, never batched."""
    return "sdpa" if settings.batch_invariant else settings.paged_attention


async def run(settings: DecodeSettings) -> None:
    started_on = allowed_cpus()  # before the placement pins this process to its own cores
    telemetry = service_telemetry("decode")
    thread = ModelThread()
    lifecycle = Lifecycle()
    servicer = DecodeServicer(telemetry, lifecycle, host_identity() if settings.kv_shm else "")
    engine: DecodeEngine | None = None
    metrics = DecodeMetrics.create(telemetry.registry, thread)
    store: KvStoreClient | None = None
    factory, server_tls = tls_services(settings)

    def register(server: grpc.aio.Server) -> list[str]:
        add_to_server(servicer, server)
        return [decode_pb2.DESCRIPTOR.services_by_name["DecodeService"].full_name]

    async def warmup() -> None:
        nonlocal store, engine
        runtime = await thread.run(load_runtime, settings)
        check_layers(runtime.model)  # a refused model fails before packing and kernel builds, not after
        if settings.kvstore_address:
            store = KvStoreClient(settings.kvstore_address, runtime.geometry.fingerprint,
                                  settings.kvstore_timeout_seconds, factory)
        pool = (PoolConfig(settings.kv_pool_blocks, settings.block_size) if settings.kv_pool_blocks
                else PoolConfig.from_megabytes(settings.kv_pool_mb, settings.block_size, runtime.geometry))
        products = await thread.run(panel_products.choose, runtime.model, runtime.device,
                                    Path(settings.model_cache_dir), products_mode(settings))
        packed = await thread.run(PackedWeights.build, runtime.model, runtime.device, packing_mode(settings),
                                  products)
        # after packing, which reads the model's own nn.Linear modules
        helpers = helper_cores(settings.gemv_helpers, started_on - allowed_cpus())
        installed = await thread.run(exact_gemv.install, runtime.model, Path(settings.model_cache_dir),
                                     settings.gemv, helpers, packed)
        if installed.helpers is not None:
            telemetry.registry.register(HelperCollector(installed.helpers.counts))
        # after the gemv kernel's install: its modules take the products of many rows as a hook
        await thread.run(prompt_products.install, runtime.model, runtime.device, Path(settings.model_cache_dir),
                         settings.prefill_products, packed, on_decode=True)
        attention = await thread.run(NativeAttention.build, runtime, Path(settings.model_cache_dir),
                                     attention_mode(settings))
        ingest = await thread.run(NativeIngest.build, Path(settings.model_cache_dir), settings.kv_ingest)
        # after the gemv kernel's install, on the model thread (it runs probe steps)
        alone = await thread.run(one_stream.for_model, runtime.model, one_stream_refusal(settings, packed))
        engine = DecodeEngine(runtime, thread, pool, decode_limits(settings), store, metrics, lifecycle.fail,
                              FastPaths(packed, attention, ingest, alone))
        engine.start()
        decode_load_gauges(telemetry.registry, engine.load)
        servicer.ready(engine, runtime.geometry)

    spec = ServerSpec("decode", settings.host, settings.port, settings.grace_seconds, settings.metrics_port,
                      server_tls)
    try:
        await serve(spec, telemetry, lifecycle, register, warmup)
    finally:
        if engine is not None:
            await engine.close()
        if store is not None:
            await store.close()
        thread.shutdown()


def main() -> None:
    run_service("decode", DecodeSettings, "decode worker: receives KV caches and generates tokens", run)


if __name__ == "__main__":
    main()
