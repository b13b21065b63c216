"""uvicorn embedded in the gateway's event loop. The gateway owns signals and draining: uvicorn's
own signal capture is turned off, and it is told to exit after the gRPC server has drained."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from services.common.tls import ServerTls
from services.common.tls_http import ReloadingSslContext


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals belong to the gateway (services.common.server)


class HttpServer:
    def __init__(self, app: FastAPI, host: str, port: int, grace_seconds: float, tls: ServerTls | None = None) -> None:
        context = ReloadingSslContext(tls).listening if tls else None  # HTTPS only, certificates reloaded
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=int(grace_seconds) or 1,
                                ssl_context_factory=(lambda _config, _default: context) if context else None)
        self._server = _EmbeddedServer(config)

    async def serve(self) -> None:
        await self._server.serve()

    @property
    def started(self) -> bool:
        return self._server.started

    def stop(self) -> None:
        self._server.should_exit = True
