"""`python -m services.prefill`: run a prefill worker."""

from __future__ import annotations

import asyncio
import sys

import grpc

from services.common.channels import ChannelPool
from services.common.config import parse_settings
from services.common.kvstore_client import KvStoreClient
from services.common.logs import setup_logging
from services.common.pb import prefill_pb2, prefill_pb2_grpc
from services.common.server import ServerSpec, serve
from services.common.worker import load_runtime, model_executor
from services.prefill.engine import ChunkGeometry, PrefillEngine
from services.prefill.servicer import PrefillServicer
from services.prefill.settings import PrefillSettings


async def run(settings: PrefillSettings) -> None:
    channels = ChannelPool()
    executor = model_executor()
    servicer = PrefillServicer(channels, settings.transfer_timeout_seconds)
    store: KvStoreClient | None = None

    def register(server: grpc.aio.Server) -> list[str]:
        prefill_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, server)
        return [prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name]

    async def warmup() -> None:
        nonlocal store
        runtime = await asyncio.get_running_loop().run_in_executor(executor, load_runtime, settings)
        if settings.kvstore_address:
            store = KvStoreClient(settings.kvstore_address, runtime.geometry.fingerprint,
                                  settings.kvstore_timeout_seconds)
        chunking = ChunkGeometry(settings.kv_chunk_tokens, settings.kv_chunk_layers)
        servicer.ready(PrefillEngine(runtime, executor, chunking, store, settings.checkpoint_kv), runtime.geometry)

    try:
        await serve(ServerSpec("prefill", settings.host, settings.port, settings.grace_seconds), register, warmup)
    finally:
        await channels.close()
        if store is not None:
            await store.close()
        executor.shutdown(wait=False, cancel_futures=True)


def main() -> None:
    try:
        settings = parse_settings(PrefillSettings, "python -m services.prefill",
                                  "prefill worker: prompt forward passes, KV streamed to decode workers")
    except ValueError as exc:
        sys.exit(f"prefill: {exc}")
    setup_logging("prefill", settings.log_level)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
