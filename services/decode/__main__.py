"""`python -m services.decode`: run a decode worker."""

from __future__ import annotations

import asyncio
import sys

import grpc

from services.common.config import parse_settings
from services.common.kvstore_client import KvStoreClient
from services.common.logs import setup_logging
from services.common.pb import decode_pb2, decode_pb2_grpc
from services.common.server import ServerSpec, serve
from services.common.worker import load_runtime, model_executor
from services.decode.engine import DecodeEngine, DecodeLimits
from services.decode.servicer import DecodeServicer
from services.decode.settings import DecodeSettings

MB = 1024 * 1024


async def run(settings: DecodeSettings) -> None:
    executor = model_executor()
    servicer = DecodeServicer()
    store: KvStoreClient | None = None
    engine: DecodeEngine | None = None

    def register(server: grpc.aio.Server) -> list[str]:
        decode_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, server)
        return [decode_pb2.DESCRIPTOR.services_by_name["DecodeService"].full_name]

    async def warmup() -> None:
        nonlocal store, engine
        runtime = await asyncio.get_running_loop().run_in_executor(executor, load_runtime, settings)
        if settings.kvstore_address:
            store = KvStoreClient(settings.kvstore_address, runtime.geometry.fingerprint,
                                  settings.kvstore_timeout_seconds)
        limits = DecodeLimits(settings.kv_timeout_seconds, int(settings.max_chunk_mb * MB),
                              settings.max_active_requests)
        engine = DecodeEngine(runtime, executor, limits, store)
        servicer.ready(engine, runtime.geometry)

    try:
        await serve(ServerSpec("decode", settings.host, settings.port, settings.grace_seconds), register, warmup)
    finally:
        if engine is not None:
            await engine.close()
        if store is not None:
            await store.close()
        executor.shutdown(wait=False, cancel_futures=True)


def main() -> None:
    try:
        settings = parse_settings(DecodeSettings, "python -m services.decode",
                                  "decode worker: receives KV caches and generates tokens")
    except ValueError as exc:
        sys.exit(f"decode: {exc}")
    setup_logging("decode", settings.log_level)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
