"""`python -m services.gateway`: run the gateway."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc

from services.common.channels import ChannelPool
from services.common.metrics import GatewayMetrics, WorkerStateCollector
from services.common.model_files import resolve_model_dir
from services.common.pb import gateway_pb2, gateway_pb2_grpc
from services.common.server import Lifecycle, Readiness, ServerSpec, run_service, serve
from services.common.tasks import TaskSet
from services.common.telemetry import service_telemetry
from services.common.tls_settings import tls_services
from services.gateway.auth import ApiKeyInterceptor, ApiKeys
from services.gateway.core import Gateway, GatewayLimits
from services.gateway.http_api import HttpApiConfig, create_app
from services.gateway.http_server import HttpServer
from services.gateway.membership import ROLES, STATES, Membership
from services.gateway.servicer import GatewayServicer
from services.gateway.settings import GatewaySettings
from services.gateway.text import PromptEncoder

log = logging.getLogger("services.gateway")


async def run(settings: GatewaySettings) -> None:
    telemetry = service_telemetry("gateway")
    factory, server_tls = tls_services(settings)
    channels = ChannelPool(factory)
    background = TaskSet()
    lifecycle = Lifecycle()
    readiness = Readiness()
    keys = ApiKeys.from_settings(settings.api_keys, settings.api_keys_file)
    servicer = GatewayServicer(telemetry, lifecycle, channels, settings.default_max_tokens,
                               settings.prefix_cache_sharing)
    http: HttpServer | None = None
    membership = Membership(settings, channels, readiness)
    telemetry.registry.register(WorkerStateCollector(membership.rows, ROLES, STATES))

    def register(server: grpc.aio.Server) -> list[str]:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
        return [gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name]

    async def warmup() -> None:
        nonlocal http
        await membership.start()
        model_dir = await asyncio.to_thread(resolve_model_dir, settings.model, Path(settings.model_cache_dir))
        template = Path(settings.chat_template).read_text() if settings.chat_template else None
        encoder = await asyncio.to_thread(PromptEncoder, model_dir, template)
        limits = GatewayLimits(settings.max_tokens_limit, settings.request_timeout_seconds, settings.kv_transfer,
                               settings.request_summary, settings.prefill_mode, settings.conditional_threshold,
                               settings.max_failovers, settings.max_prefill_retries,
                               settings.prefill_timeout_seconds, settings.prefix_routing == "on")
        gateway = Gateway(encoder, membership.prefill, membership.decode, channels, limits,
                          GatewayMetrics.create(telemetry.registry, lambda: gateway.active_requests))
        servicer.ready(gateway)
        if settings.http_port:
            app = create_app(servicer.core, lifecycle, keys,
                             HttpApiConfig(settings.model_id, settings.default_max_tokens,
                                           settings.prefix_cache_sharing), lambda: readiness.ready)
            http = HttpServer(app, settings.host, settings.http_port, settings.grace_seconds, server_tls)
            background.spawn(http.serve(), "http-api")
            log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1 (model %r)", "https" if server_tls else "http",
                     settings.host, settings.http_port, settings.model_id)
        keys.announce()
        log.info("routing to prefill %s and decode %s (prefill mode %s, kv transfer %s)",
                 _sources(settings.prefill_addresses, settings.prefill_addresses_file),
                 _sources(settings.decode_addresses, settings.decode_addresses_file), settings.prefill_mode,
                 settings.kv_transfer)

    spec = ServerSpec("gateway", settings.host, settings.port, settings.grace_seconds, settings.metrics_port,
                      server_tls)
    try:
        service = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
        await serve(spec, telemetry, lifecycle, register, warmup, [ApiKeyInterceptor(keys, service, telemetry)],
                    readiness)
    finally:
        if http is not None:
            http.stop()
        await background.wait_all(timeout=5.0)
        await membership.close()
        await channels.close()


def _sources(listed: str, file: str) -> str:
    return " + ".join(part for part in (listed, file and f"file {file}") if part)


def main() -> None:
    run_service("gateway", GatewaySettings,
                "gateway: the public gRPC API; routes requests to prefill and decode workers", run)


if __name__ == "__main__":
    main()
