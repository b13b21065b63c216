"""kvstore settings (flags and environment variables)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import check_port, check_positive, setting
from services.common.logs import check_log_level
from services.common.shm import check_prefix
from services.common.tls_settings import TlsSettings
from services.kvstore.backend import BACKEND_NAMES, BackendSettings

MB = 1024 * 1024


@dataclass(slots=True)
class KvStoreSettings(TlsSettings):
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 in containers)", "KVSTORE_HOST")
    port: int = setting(50054, "gRPC port", "KVSTORE_PORT")
    metrics_port: int = setting(
        9103, "HTTP port of the Prometheus /metrics endpoint (0: off)",
        "KVSTORE_METRICS_PORT")
    backend: str = setting("memory", f"storage backend: {', '.join(BACKEND_NAMES)}", "KVSTORE_BACKEND")
    byte_budget_mb: float = setting(1024.0, "most bytes stored; the oldest entries are evicted first",
                                    "KVSTORE_BYTE_BUDGET_MB")
    default_ttl_seconds: float = setting(600.0, "TTL of a value whose Put names none", "KVSTORE_DEFAULT_TTL_SECONDS")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis server of the redis backend", "REDIS_URL")
    redis_key_prefix: str = setting("disagg", "prefix of every Redis key this store writes", "REDIS_KEY_PREFIX")
    redis_part_mb: float = setting(8.0, "values are split into Redis strings of at most this size",
                                   "REDIS_PART_MB")
    shm_prefix: str = setting("disagg-kvstore", "name prefix of the shm backend's segments in /dev/shm (one "
                              "per value); the reaper removes those of a dead kvstore", "KVSTORE_SHM_PREFIX")
    shm_reap_seconds: float = setting(30.0, "how often the shm backend unlinks expired values and the segments "
                                            "of dead kvstores (also at start)", "KVSTORE_SHM_REAP_SECONDS")
    log_level: str = setting("INFO", "log level", "LOG_LEVEL")
    grace_seconds: float = setting(10.0, "how long in-flight calls may finish after SIGTERM", "GRACE_SECONDS")

    def __post_init__(self) -> None:
        TlsSettings.__post_init__(self)
        check_port("port", self.port)
        check_port("metrics_port", self.metrics_port, allow_zero=True)
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {self.backend!r}")
        for name in ("byte_budget_mb", "default_ttl_seconds", "redis_part_mb", "shm_reap_seconds"):
            check_positive(name, getattr(self, name))
        if self.redis_part_mb > 256:
            raise ValueError("redis_part_mb must be <= 256 (Redis strings are limited to 512 MB)")
        if not self.redis_key_prefix:
            raise ValueError("redis_key_prefix must not be empty")
        check_prefix(self.shm_prefix)
        check_log_level(self.log_level)

    def backend_settings(self) -> BackendSettings:
        return BackendSettings(int(self.byte_budget_mb * MB), self.redis_url, self.redis_key_prefix,
                               int(self.redis_part_mb * MB), self.shm_prefix, self.shm_reap_seconds)
