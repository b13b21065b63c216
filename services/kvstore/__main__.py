"""`python -m services.kvstore`: run the kvstore service."""

from __future__ import annotations

import asyncio
import logging

import grpc

from services.common import shm
from services.common.errors import BackendUnavailable
from services.common.pb import kvstore_pb2, kvstore_pb2_grpc
from services.common.server import Lifecycle, ServerSpec, run_service, serve
from services.common.telemetry import service_telemetry
from services.common.tls_settings import tls_services
from services.kvstore.backend import make_backend
from services.kvstore.servicer import KvStoreServicer
from services.kvstore.settings import KvStoreSettings

log = logging.getLogger("services.kvstore")


async def run(settings: KvStoreSettings) -> None:
    backend = make_backend(settings.backend, settings.backend_settings())
    telemetry = service_telemetry("kvstore")
    lifecycle = Lifecycle()

    def register(server: grpc.aio.Server) -> list[str]:
        kvstore_pb2_grpc.add_KvStoreServiceServicer_to_server(
            KvStoreServicer(telemetry, lifecycle, backend, settings.default_ttl_seconds,
                            shm.host_identity()), server)
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

    spec = ServerSpec("kvstore", settings.host, settings.port, settings.grace_seconds, settings.metrics_port,
                      tls_services(settings)[1])
    try:
        await serve(spec, telemetry, lifecycle, register, warmup)
    finally:
        await backend.close()


def main() -> None:
    run_service("kvstore", KvStoreSettings,
                "kvstore service: KV chunks by key with TTL and a byte budget", run)


if __name__ == "__main__":
    main()
