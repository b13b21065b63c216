"""Decode settings (flags and environment variables)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import check_port, check_positive, setting
from services.common.worker import WorkerSettings


@dataclass(slots=True)
class DecodeSettings(WorkerSettings):
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 in containers)", "DECODE_HOST")
    port: int = setting(50053, "gRPC port", "DECODE_PORT")
    metrics_port: int = setting(
        9102, "HTTP port of the Prometheus /metrics endpoint (0: off)",
        "DECODE_METRICS_PORT")
    kv_timeout_seconds: float = setting(120.0, "how long an admitted request waits for its KV",
                                        "KV_TIMEOUT_SECONDS")
    max_chunk_mb: float = setting(64.0, "largest KV chunk accepted", "MAX_CHUNK_MB")
    max_active_requests: int = setting(64, "requests admitted at once; more get RESOURCE_EXHAUSTED",
                                       "MAX_ACTIVE_REQUESTS")

    def __post_init__(self) -> None:
        WorkerSettings.__post_init__(self)
        check_port("port", self.port)
        check_port("metrics_port", self.metrics_port, allow_zero=True)
        for name in ("kv_timeout_seconds", "max_chunk_mb", "max_active_requests"):
            check_positive(name, getattr(self, name))
