"""`python -m services.kvstore`: run the kvstore service."""

from __future__ import annotations

import asyncio
import logging
import sys

import grpc

from services.common.config import parse_settings
from services.common.errors import BackendUnavailable
from services.common.logs import setup_logging
from services.common.pb import kvstore_pb2, kvstore_pb2_grpc
from services.common.server import ServerSpec, serve
from services.kvstore.backend import make_backend
from services.kvstore.servicer import KvStoreServicer
from services.kvstore.settings import KvStoreSettings

log = logging.getLogger("services.kvstore")


async def run(settings: KvStoreSettings) -> None:
    backend = make_backend(settings.backend, settings.backend_settings())

    def register(server: grpc.aio.Server) -> list[str]:
        kvstore_pb2_grpc.add_KvStoreServiceServicer_to_server(
            KvStoreServicer(backend, settings.default_ttl_seconds), server)
        return [kvstore_pb2.DESCRIPTOR.services_by_name["KvStoreService"].full_name]

    async def warmup() -> None:
        # Stay NOT_SERVING until the backend answers; calls meanwhile get UNAVAILABLE.
        while True:
            try:
                await backend.stats()
                return
            except BackendUnavailable as exc:
                log.warning("waiting for the backend: %s", exc)
                await asyncio.sleep(1.0)

    try:
        await serve(ServerSpec("kvstore", settings.host, settings.port, settings.grace_seconds), register, warmup)
    finally:
        await backend.close()


def main() -> None:
    try:
        settings = parse_settings(KvStoreSettings, "python -m services.kvstore", "kvstore service: KV chunks by key with TTL and a byte budget")
    except ValueError as exc:
        sys.exit(f"kvstore: {exc}")
    setup_logging("kvstore", settings.log_level)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
