"""Prefill settings (flags and environment variables)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import check_port, check_positive, setting
from services.common.kv_codec import ENCODINGS
from services.common.kv_shm import SHM_CHUNK_TOKENS, TRANSPORTS
from services.common.shm import check_prefix
from services.common.worker import WorkerSettings


@dataclass(slots=True)
class PrefillSettings(WorkerSettings):
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 in containers)", "PREFILL_HOST")
    port: int = setting(50052, "gRPC port", "PREFILL_PORT")
    metrics_port: int = setting(
        9101, "HTTP port of the Prometheus /metrics endpoint (0: off)",
        "PREFILL_METRICS_PORT")
    kv_chunk_tokens: int = setting(512, "tokens per KV chunk", "KV_CHUNK_TOKENS")
    kv_chunk_layers: int = setting(4, "layers per KV chunk; a layer group is sent as soon as it is computed",
                                   "KV_CHUNK_LAYERS")
    kv_shm_chunk_tokens: int = setting(SHM_CHUNK_TOKENS, "tokens per KV chunk of a raw transfer through shared "
                                       "memory (--kv-transport shm or auto), at most 16 MiB a chunk; fp8, a prompt "
                                       "longer than --prefill-chunk-tokens, or one also written to the kvstore uses "
                                       "--kv-chunk-tokens", "KV_SHM_CHUNK_TOKENS")
    kv_wire_encoding: str = setting("raw", "KV encoding on the wire (and in the kvstore): raw (exact) or fp8 "
                                    "(float8 e4m3 with a scale per layer, key/value, kv head and chunk: "
                                    "a quarter of float32's bytes, lossy)", "KV_WIRE_ENCODING")
    prefill_chunk_tokens: int = setting(2048, "prompts longer than this are prefilled in chunks of this many "
                                        "tokens (a multiple of --kv-chunk-tokens)", "PREFILL_CHUNK_TOKENS")
    prefill_batch_tokens: int = setting(0, "batch queued prompts into one forward pass up to this many tokens "
                                        "(0: off; batched results may differ in the last bits)",
                                        "PREFILL_BATCH_TOKENS")
    prefill_batch_wait_ms: float = setting(5.0, "longest a prompt waits for others to batch with",
                                           "PREFILL_BATCH_WAIT_MS")
    transfer_timeout_seconds: float = setting(120.0, "deadline of one KV transfer to a decode worker",
                                              "TRANSFER_TIMEOUT_SECONDS")
    checkpoint_kv: bool = setting(False, "also write every request's KV to the kvstore (checkpoint)",
                                  "CHECKPOINT_KV")
    kv_transport: str = setting("grpc", "how KV chunk bytes go to the decode worker: grpc (inline in the "
                                "TransferKv stream), shm (a shared-memory segment; the decode must be on this "
                                "host) or auto (shm when the decode reports this host's identity, else grpc)",
                                "KV_TRANSPORT")
    shm_prefix: str = setting("disagg-prefill", "name prefix of this worker's shared-memory segments; the "
                              "reaper unlinks those of dead workers with the same prefix", "SHM_PREFIX")
    prefix_cache: str = setting("on", "keep the KV of computed full prompt blocks and compute a prompt only from "
                                "its first block not kept (on, off; off: every prompt computed whole, "
                                "bit-exact)", "PREFIX_CACHE")
    prefix_cache_mb: float = setting(256.0, "memory for the prefix cache (least recently used blocks go first)",
                                     "PREFIX_CACHE_MB")
    block_size: int = setting(16, "tokens per prefix-cache block (as the decode's --block-size)", "KV_BLOCK_SIZE")
    prefix_cache_kvstore: str = setting("off", "on: prefix blocks also go to the kvstore (--kvstore-address) and "
                                        "are looked up there, shared by every prefill worker and kept across "
                                        "restarts; they share the kvstore's byte budget with KV transfers and "
                                        "swapped sequences", "PREFIX_CACHE_KVSTORE")
    prefix_cache_ttl_seconds: int = setting(3600, "how long prefix blocks written to the kvstore live there",
                                            "PREFIX_CACHE_TTL_SECONDS")
    shm_reap_interval_seconds: float = setting(60.0, "how often orphaned shared-memory segments are reaped "
                                               "(also once at start)", "SHM_REAP_INTERVAL_SECONDS")

    def __post_init__(self) -> None:
        WorkerSettings.__post_init__(self)
        check_port("port", self.port)
        check_port("metrics_port", self.metrics_port, allow_zero=True)
        check_positive("kv_chunk_tokens", self.kv_chunk_tokens)
        check_positive("kv_chunk_layers", self.kv_chunk_layers)
        check_positive("kv_shm_chunk_tokens", self.kv_shm_chunk_tokens)
        if self.kv_wire_encoding not in ENCODINGS:
            raise ValueError(f"kv_wire_encoding must be one of {list(ENCODINGS)}, got {self.kv_wire_encoding!r}")
        if self.prefill_chunk_tokens <= 0 or self.prefill_chunk_tokens % self.kv_chunk_tokens:
            raise ValueError(f"prefill_chunk_tokens ({self.prefill_chunk_tokens}) must be a positive multiple of "
                             f"kv_chunk_tokens ({self.kv_chunk_tokens})")
        check_positive("transfer_timeout_seconds", self.transfer_timeout_seconds)
        if self.prefill_batch_tokens < 0 or self.prefill_batch_wait_ms < 0:
            raise ValueError("prefill_batch_tokens and prefill_batch_wait_ms must be >= 0")
        if self.kv_transport not in TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {list(TRANSPORTS)}, got {self.kv_transport!r}")
        check_prefix(self.shm_prefix)
        for name in ("prefix_cache", "prefix_cache_kvstore"):
            if getattr(self, name) not in ("on", "off"):
                raise ValueError(f"{name} must be on or off, got {getattr(self, name)!r}")
        if self.prefix_cache_kvstore == "on" and not self.kvstore_address:
            raise ValueError("prefix_cache_kvstore needs kvstore_address")
        check_positive("prefix_cache_mb", self.prefix_cache_mb)
        check_positive("block_size", self.block_size)
        check_positive("prefix_cache_ttl_seconds", self.prefix_cache_ttl_seconds)
        check_positive("shm_reap_interval_seconds", self.shm_reap_interval_seconds)
        if self.checkpoint_kv and not self.kvstore_address:
            raise ValueError("checkpoint_kv needs kvstore_address")
