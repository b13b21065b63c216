"""`python -m services.prefill`: run a prefill worker."""

from __future__ import annotations

from pathlib import Path

import grpc

from services.common.channels import ChannelPool
from services.common.kv_shm import ShmTransport
from services.common.kvstore_client import KvStoreClient
from services.common.metrics import PrefillMetrics
from services.common.model_thread import ModelThread
from services.common.pb import prefill_pb2, prefill_pb2_grpc
from services.common.server import Lifecycle, ServerSpec, run_service, serve
from services.common.shm import host_identity
from services.common.shm_reaper import ShmReaper
from services.common.telemetry import service_telemetry
from services.common.tls_settings import tls_services
from services.common.worker import load_runtime
from services.decode import prompt_products
from services.prefill.batcher import PrefillBatcher
from services.prefill.prefix_cache import PrefixCache, PrefixCacheMetrics
from services.prefill.prefix_reuse import PrefixReuse
from services.prefill.prefix_store import PrefixStore
from services.prefill.engine import ChunkGeometry, PrefillEngine
from services.prefill.servicer import PrefillServicer
from services.prefill.settings import PrefillSettings


async def run(settings: PrefillSettings) -> None:
    telemetry = service_telemetry("prefill")
    factory, server_tls = tls_services(settings)
    channels = ChannelPool(factory)
    thread = ModelThread()
    lifecycle = Lifecycle()
    transport = ShmTransport(settings.kv_transport, settings.shm_prefix, host_identity(), settings.kv_shm_chunk_tokens)
    servicer = PrefillServicer(telemetry, lifecycle, channels, settings.transfer_timeout_seconds, transport)
    reaper = ShmReaper(settings.shm_prefix, settings.shm_reap_interval_seconds)
    store: KvStoreClient | None = None
    batcher: PrefillBatcher | None = None
    engine: PrefillEngine | None = None

    def register(server: grpc.aio.Server) -> list[str]:
        prefill_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, server)
        return [prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name]

    async def warmup() -> None:
        nonlocal store, batcher, engine
        runtime = await thread.run(load_runtime, settings, settings.packed_weights == "all")
        await thread.run(prompt_products.install, runtime.model, runtime.device, Path(settings.model_cache_dir),
                         settings.prefill_products)
        if settings.kvstore_address:
            store = KvStoreClient(settings.kvstore_address, runtime.geometry.fingerprint,
                                  settings.kvstore_timeout_seconds, factory)
        chunking = ChunkGeometry(settings.kv_chunk_tokens, settings.kv_chunk_layers, settings.prefill_chunk_tokens,
                                 settings.kv_wire_encoding)
        if settings.prefill_batch_tokens:
            batcher = PrefillBatcher(runtime, thread, settings.prefill_batch_tokens,
                                     settings.prefill_batch_wait_ms / 1000, metrics.batch_size.observe)
        prefix = None
        if settings.prefix_cache == "on":
            geometry = runtime.geometry
            cache = PrefixCache(int(settings.prefix_cache_mb * 1024 * 1024), settings.block_size, geometry.fingerprint,
                                geometry.kv_bytes_per_token * settings.block_size,
                                PrefixCacheMetrics.create(telemetry.registry))
            tier = None if store is None or settings.prefix_cache_kvstore == "off" else PrefixStore(
                store, geometry, settings.block_size, settings.prefix_cache_ttl_seconds)
            prefix = PrefixReuse(cache, tier)
        engine = PrefillEngine(runtime, thread, chunking, store, settings.checkpoint_kv, metrics, batcher, prefix)
        servicer.ready(engine, runtime.geometry)

    metrics = PrefillMetrics.create(telemetry.registry, thread, lambda: servicer.active_requests)
    spec = ServerSpec("prefill", settings.host, settings.port, settings.grace_seconds, settings.metrics_port,
                      server_tls)
    reaper.start()  # before serving: segments a killed predecessor left behind go first
    try:
        await serve(spec, telemetry, lifecycle, register, warmup)
    finally:
        await reaper.stop()
        if batcher is not None:
            await batcher.close()
        if engine is not None:
            await engine.close()
        await channels.close()
        if store is not None:
            await store.close()
        thread.shutdown()


def main() -> None:
    run_service("prefill", PrefillSettings,
                "prefill worker: prompt forward passes, KV streamed to decode workers", run)


if __name__ == "__main__":
    main()
