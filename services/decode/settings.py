"""Decode settings (flags and environment variables)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.common.config import check_port, check_positive, setting
from services.common.kv_ingest import MODES as INGEST_MODES
from services.common.worker import WorkerSettings
from services.decode.exact_gemv import MODES as GEMV_MODES
from services.decode.gemv_helpers import SETTINGS_HELP as HELPERS_HELP, check_setting as check_gemv_helpers
from services.decode.native_attention import MODES as ATTENTION_MODES
from services.decode.panel_products import MODES as PRODUCTS_MODES


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
    max_active_requests: int = setting(256, "requests admitted at once; more get RESOURCE_EXHAUSTED",
                                       "MAX_ACTIVE_REQUESTS")
    max_batch_size: int = setting(64, "most sequences in one decode step", "MAX_BATCH_SIZE")
    kv_pool_mb: float = setting(1024.0, "size of the paged KV pool in MB (ignored when --kv-pool-blocks is set)",
                                "KV_POOL_MB")
    kv_pool_blocks: int = setting(0, "size of the paged KV pool in blocks (0: from --kv-pool-mb)", "KV_POOL_BLOCKS")
    block_size: int = setting(16, "tokens per KV block", "KV_BLOCK_SIZE")
    max_cache_budget_mb: float = setting(0.0, "default per-request KV budget: a request holding more is "
                                         "preempted while others need the pool (0: no budget)",
                                         "MAX_CACHE_BUDGET_MB")
    reject_threshold: float = setting(0.95, "pool pressure above which new requests get RESOURCE_EXHAUSTED",
                                      "KV_REJECT_THRESHOLD")
    preempt_threshold: float = setting(0.85, "pool pressure above which the newest sequences are preempted",
                                       "KV_PREEMPT_THRESHOLD")
    check_kv_finite: bool = setting(True, "refuse KV chunks holding NaN or infinity (DATA_LOSS); a cheap check "
                                    "(one pass over the bytes) that can be turned off", "CHECK_KV_FINITE")
    kv_shm: bool = setting(True, "accept KV chunk bytes through shared memory from a prefill worker on this host "
                           "(--no-kv-shm: refuse; prefills with --kv-transport auto then send them inline)",
                           "KV_SHM")
    batch_invariant: bool = setting(False, "compute every sequence of a batched step exactly as a batch of one "
                                    "(bit-identical logits at any batch size; slower: see the README)",
                                    "BATCH_INVARIANT")
    prefix_cache: str = setting("on", "keep the KV blocks of prompts (full blocks) after their requests end, "
                                "evictable, and take a new prompt's cached prefix from them instead of its "
                                "transfer (on, off)", "PREFIX_CACHE")
    paged_attention: str = setting("auto", "how batched steps attend: native (a C kernel over the blocks in place, "
                                   "compiled at start by the machine's C compiler; CPU, float32), sdpa (torch "
                                   "SDPA over a copy of the blocks), or auto (native where it builds, else sdpa)",
                                   "PAGED_ATTENTION")
    kv_ingest: str = setting("auto", "how KV chunks are received: native (checksum, finiteness check and pool "
                             "write in one pass of C, fp8 dequantized on the way; compiled at start; CPU), python "
                             "(separate passes), or auto (native where it builds)", "KV_INGEST")
    gemv: str = setting("auto", "how a batch of one computes its matrix-vector products: native (a C kernel that "
                        "sums in the BLAS's own order, bit-identical to F.linear and about twice as fast as one MKL "
                        "thread; each layer checked against F.linear at start; compiled at start; CPU, float32), "
                        "torch (F.linear), or auto (native for the layers whose check passes, unless torch's threads "
                        "make F.linear faster)", "GEMV")
    gemv_helpers: str = setting("auto", "threads on other cores that help with a batch of one's products (the exact "
                                "gemv kernel) and a batched step's (the panel kernel), with the same bits, pinned one "
                                "per core at SCHED_IDLE so that they run only while that core has nothing else to "
                                "do: " + HELPERS_HELP, "GEMV_HELPERS")
    batched_products: str = setting("auto", "how a batched step computes its products on the packed weights: "
                                    "native (a C kernel that streams each weight once in panels, compiled at "
                                    "start; CPU, float32), onednn (oneDNN's packed products), or auto (whichever "
                                    "is faster on the model's first layers at start, logged)", "BATCHED_PRODUCTS")
    one_stream: bool = setting(True, "step a stream alone in the fewest calls: the same operations on the same "
                               "values as the model's modules (bit-identical), its products written into shared "
                               "buffers (by the exact gemv kernel where --gemv installed it, else by F.linear) and "
                               "attention called directly; --no-one-stream: through the model's modules",
                               "ONE_STREAM")
    step_timeout_seconds: float = setting(300.0, "a decode step running longer than this means the model is stuck: "
                                          "the worker turns NOT_SERVING and exits non-zero", "STEP_TIMEOUT_SECONDS")

    def __post_init__(self) -> None:
        WorkerSettings.__post_init__(self)
        check_port("port", self.port)
        check_port("metrics_port", self.metrics_port, allow_zero=True)
        for name in ("kv_timeout_seconds", "max_chunk_mb", "max_active_requests", "max_batch_size", "kv_pool_mb",
                     "block_size", "step_timeout_seconds"):
            check_positive(name, getattr(self, name))
        if not 0 <= self.max_cache_budget_mb < math.inf:
            raise ValueError(f"max_cache_budget_mb must be a finite number >= 0, got {self.max_cache_budget_mb}")
        if self.batch_invariant and self.packed_weights == "all":
            raise ValueError("batch_invariant needs a batch of one's own products: packed_weights batched or off")
        if self.paged_attention not in ATTENTION_MODES:
            raise ValueError(f"paged_attention must be one of {', '.join(ATTENTION_MODES)}, "
                             f"got {self.paged_attention!r}")
        if self.kv_ingest not in INGEST_MODES:
            raise ValueError(f"kv_ingest must be one of {', '.join(INGEST_MODES)}, got {self.kv_ingest!r}")
        if self.batched_products not in PRODUCTS_MODES:
            raise ValueError(f"batched_products must be one of {', '.join(PRODUCTS_MODES)}, "
                             f"got {self.batched_products!r}")
        if self.gemv not in GEMV_MODES:
            raise ValueError(f"gemv must be one of {', '.join(GEMV_MODES)}, got {self.gemv!r}")
        check_gemv_helpers(self.gemv_helpers)
        if self.prefix_cache not in ("on", "off"):
            raise ValueError(f"prefix_cache must be on or off, got {self.prefix_cache!r}")
        if self.kv_pool_blocks < 0:
            raise ValueError(f"kv_pool_blocks must be >= 0, got {self.kv_pool_blocks}")
        if not 0 < self.preempt_threshold <= self.reject_threshold <= 1:
            raise ValueError("thresholds must satisfy 0 < preempt_threshold <= reject_threshold <= 1, got "
                             f"{self.preempt_threshold} and {self.reject_threshold}")
