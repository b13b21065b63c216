"""Settings and start-up shared by the two model workers (prefill and decode)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from services.common import placement
from services.common.config import setting
from services.common.logs import check_log_level
from services.common.model_files import default_cache_dir
from services.common.packed_weights import PACKED_MODES, pack_linears
from services.common.placement import check_cpus
from services.common.runtime import DTYPES, ModelRuntime
from services.common.targets import check_address_list
from services.common.tls_settings import TlsSettings

log = logging.getLogger(__name__)

PROMPT_PRODUCTS_MODES = ("auto", "native", "torch")  # services/decode/prompt_products.py


@dataclass(slots=True)
class WorkerSettings(TlsSettings):
    model: str = setting("default", "'default' (bundled SmolLM2-135M-Instruct), 'tiny' (random test model) "
                                    "or a local Hugging Face Llama-family folder", "MODEL")
    dtype: str = setting("float32", f"weights and KV dtype: {', '.join(DTYPES)}", "MODEL_DTYPE")
    device: str = setting("auto", "torch device: auto (cuda if present), cpu, cuda, cuda:N", "DEVICE")
    model_cache_dir: str = setting(str(default_cache_dir()), "where converted models are cached", "MODEL_CACHE_DIR")
    torch_threads: int = setting(0, "torch intra-op threads (0: one per core of --cpus; never more than those "
                                    "cores)", "TORCH_THREADS")
    cpus: str = setting("", "cores to run on: empty (all this process may use), 'first-half' / 'second-half' "
                            "of them (make up: decode first, prefill second) or a list such as 0-3,6", "WORKER_CPUS")
    kvstore_address: str = setting("", "kvstore service host:port (empty: none); several, comma separated, when "
                                   "they share one backend: calls go round robin to those serving", "KVSTORE_ADDRESS")
    kvstore_timeout_seconds: float = setting(10.0, "deadline of each kvstore call", "KVSTORE_TIMEOUT_SECONDS")
    packed_weights: str = setting("batched", "compute on oneDNN-packed copies of the weights (CPU; about 2x faster "
                                  "matrix products for decode-sized batches): batched (the decode's steps of 2+ "
                                  "sequences; a batch of one and the prefill stay bit-identical to Hugging "
                                  "Face), all (the decode's batch of one and the prefill worker's forward passes "
                                  "too: faster, not bit-identical), off", "PACKED_WEIGHTS")
    prefill_products: str = setting("auto", "the matrix products of a prompt's forward pass (the prefill worker's, "
                                    "and the decode's own prefills and prompt log-probabilities): native (a C "
                                    "panel kernel, bit-identical to torch's: torch's order of sums is read off at "
                                    "start, shapes it cannot match keep torch's; ~2x faster on one AMD Zen 5 core; "
                                    "the prefill holds the weights once more in its layout, a decode lends those "
                                    "of its batched steps), torch, or auto (native where faster on a prompt-sized "
                                    "product, timed at start; on a decode only where its batched steps lend the "
                                    "weights)", "PREFILL_PRODUCTS")
    log_level: str = setting("INFO", "log level", "LOG_LEVEL")
    grace_seconds: float = setting(30.0, "how long in-flight requests may finish after SIGTERM", "GRACE_SECONDS")

    def __post_init__(self) -> None:
        TlsSettings.__post_init__(self)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads}")
        check_cpus(self.cpus)
        if self.kvstore_timeout_seconds <= 0:
            raise ValueError("kvstore_timeout_seconds must be > 0")
        check_address_list("kvstore_address", self.kvstore_address)
        check_log_level(self.log_level)
        if self.packed_weights not in PACKED_MODES:
            raise ValueError(f"packed_weights must be one of {', '.join(PACKED_MODES)}, got {self.packed_weights!r}")
        if self.prefill_products not in PROMPT_PRODUCTS_MODES:
            raise ValueError(f"prefill_products must be one of {', '.join(PROMPT_PRODUCTS_MODES)}, "
                             f"got {self.prefill_products!r}")


def load_runtime(settings: WorkerSettings, pack_linears_too: bool = False) -> ModelRuntime:
    """Load the model (blocking; run it in the model thread); with `pack_linears_too`, its linear
    layers compute on oneDNN-packed weights (the prefill with --packed-weights all)."""
    placement.apply(settings.cpus, settings.torch_threads)
    runtime = ModelRuntime(settings.model, settings.dtype, settings.device, Path(settings.model_cache_dir))
    placement.check_dtype(DTYPES[settings.dtype], runtime.device)
    if pack_linears_too and (count := pack_linears(runtime.model, runtime.device)):
        log.info("%d linear layers packed for oneDNN (--packed-weights all): not bit-identical to HF", count)
    runtime.prefill([1, 2, 3, 4], lambda *_: None)  # warm-up: the first forward pass is slow
    runtime.grammars.warm()  # the tokenizer as the grammar engine sees it (~0.3 s), before any request
    log.info("model %s ready: fingerprint %s, %d layers, %d KV bytes/token", settings.model,
             runtime.geometry.fingerprint, runtime.geometry.num_layers, runtime.geometry.kv_bytes_per_token)
    return runtime
