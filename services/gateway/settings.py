"""Gateway settings (flags and environment variables)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.config import check_port, check_positive, setting, split_addresses
from services.common.logs import check_log_level
from services.common.model_files import default_cache_dir
from services.common.targets import check_address_list
from services.common.tls_settings import PublicTlsSettings

KV_TRANSFER_MODES = ("direct", "kvstore")
PREFILL_MODES = ("disaggregated", "unified", "conditional", "adaptive")
DEFAULT_PREFILL, DEFAULT_DECODE = "127.0.0.1:50052", "127.0.0.1:50053"


@dataclass(slots=True)
class GatewaySettings(PublicTlsSettings):
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 in containers)", "GATEWAY_HOST")
    port: int = setting(50051, "gRPC port", "GATEWAY_PORT")
    metrics_port: int = setting(
        9100, "HTTP port of the Prometheus /metrics endpoint (0: off)",
        "GATEWAY_METRICS_PORT")
    prefill_addresses: str = setting("", "prefill workers, comma separated host:port; a DNS name stands for every "
                                     "address it resolves to, resolved again every --membership-refresh-seconds "
                                     f"(empty and no --prefill-addresses-file: {DEFAULT_PREFILL})",
                                     "PREFILL_ADDRESSES")
    prefill_addresses_file: str = setting("", "file of prefill workers, one host:port a line, '#' comments (a "
                                          "mounted ConfigMap); read again when it changes", "PREFILL_ADDRESSES_FILE")
    decode_addresses: str = setting("", "decode workers, comma separated host:port (as above; empty and no "
                                    f"--decode-addresses-file: {DEFAULT_DECODE})", "DECODE_ADDRESSES")
    decode_addresses_file: str = setting("", "file of decode workers (as --prefill-addresses-file)",
                                         "DECODE_ADDRESSES_FILE")
    http_port: int = setting(8000, "port of the OpenAI-compatible HTTP API (0: off); it listens on --host",
                             "GATEWAY_HTTP_PORT")
    served_model_name: str = setting("", "model id of the HTTP API (default: derived from --model)",
                                     "SERVED_MODEL_NAME")
    api_keys: str = setting("", "comma separated API keys; when any key is set, both APIs require one",
                            "API_KEYS")
    api_keys_file: str = setting("", "file of API keys, one per line", "API_KEYS_FILE")
    kv_transfer: str = setting("direct", "how KV reaches decode: 'direct' (prefill streams it to the decode "
                               "worker) or 'kvstore' (prefill stores it, decode loads it)", "KV_TRANSFER")
    prefill_mode: str = setting("adaptive", "where prompts are prefilled: 'disaggregated' (prefill workers), "
                                "'unified' (the decode worker itself), 'conditional' (the decode worker when the "
                                "prompt is shorter than --conditional-threshold) or 'adaptive' (such a prompt goes "
                                "to the decode worker when the prefill workers have more prompts queued than it)",
                                "PREFILL_MODE")
    conditional_threshold: int = setting(256, "prompt length (tokens) below which conditional and adaptive modes "
                                         "may prefill on the decode worker", "CONDITIONAL_THRESHOLD")
    max_failovers: int = setting(2, "times a request moves to another decode worker when its worker fails",
                                 "MAX_FAILOVERS")
    max_prefill_retries: int = setting(2, "times a prefill moves to another prefill worker when its worker fails "
                                       "(UNAVAILABLE, DEADLINE_EXCEEDED); the decode keeps the request",
                                       "MAX_PREFILL_RETRIES")
    prefill_timeout_seconds: float = setting(60.0, "deadline of one prefill call (forward pass + KV transfer); past "
                                             "it the prefill worker is given up on and the prefill retried",
                                             "PREFILL_TIMEOUT_SECONDS")
    model: str = setting("default", "model whose tokenizer and context length the gateway uses "
                                    "(same values as the workers' --model)", "MODEL")
    model_cache_dir: str = setting(str(default_cache_dir()), "where converted models are cached", "MODEL_CACHE_DIR")
    chat_template: str = setting("", "a Jinja chat template file that replaces the model's own (for example one "
                                     "that renders tools; empty: the model's)", "CHAT_TEMPLATE")
    default_max_tokens: int = setting(256, "max_tokens of a request that names none", "DEFAULT_MAX_TOKENS")
    max_tokens_limit: int = setting(4096, "largest max_tokens a request may ask for", "MAX_TOKENS_LIMIT")
    request_timeout_seconds: float = setting(600.0, "deadline of each call to a worker", "REQUEST_TIMEOUT_SECONDS")
    membership_refresh_seconds: float = setting(1.0, "how often worker DNS names are resolved again and address "
                                                "files checked for changes", "MEMBERSHIP_REFRESH_SECONDS")
    health_timeout_seconds: float = setting(2.0, "deadline of a worker health check, and of a health watch's "
                                            "first answer", "HEALTH_TIMEOUT_SECONDS")
    health_retry_max_seconds: float = setting(1.0, "longest wait before re-establishing a broken worker health "
                                              "watch (exponential backoff with jitter from 0.1 s)",
                                              "HEALTH_RETRY_MAX_SECONDS")
    failure_backoff_seconds: float = setting(1.0, "a worker whose call failed (UNAVAILABLE, prefill deadline) is "
                                             "skipped this long, then until a health check passes; doubles per "
                                             "failed check", "FAILURE_BACKOFF_SECONDS")
    failure_backoff_max_seconds: float = setting(10.0, "cap of that backoff", "FAILURE_BACKOFF_MAX_SECONDS")
    request_summary: bool = setting(False, "log one line per finished request (TTFT, handoff latency, KV bytes, "
                                    "tokens/s)", "REQUEST_SUMMARY")
    prefix_routing: str = setting("on", "choose the prefill worker by the prompt blocks it already computed "
                                  "(its prefix cache) weighed against its load (on), or by load alone (off)",
                                  "PREFIX_ROUTING")
    prefix_cache_sharing: bool = setting(False, "let requests of different API keys share prefix-cache blocks "
                                         "(by default each key has its own, so no tenant can time another's "
                                         "prompts)", "PREFIX_CACHE_SHARING")
    log_level: str = setting("INFO", "log level", "LOG_LEVEL")
    grace_seconds: float = setting(30.0, "how long in-flight requests may finish after SIGTERM", "GRACE_SECONDS")

    def __post_init__(self) -> None:
        PublicTlsSettings.__post_init__(self)
        check_port("port", self.port)
        check_port("metrics_port", self.metrics_port, allow_zero=True)
        check_port("http_port", self.http_port, allow_zero=True)
        if self.chat_template and not Path(self.chat_template).is_file():
            raise ValueError(f"chat_template {self.chat_template!r} is not a file")
        if self.api_keys_file and not Path(self.api_keys_file).is_file():
            raise ValueError(f"api_keys_file {self.api_keys_file!r} does not exist")
        self._check_addresses()
        if self.prefix_routing not in ("on", "off"):
            raise ValueError(f"prefix_routing must be on or off, got {self.prefix_routing!r}")
        if self.prefill_mode not in PREFILL_MODES:
            raise ValueError(f"prefill_mode must be one of {PREFILL_MODES}, got {self.prefill_mode!r}")
        if min(self.conditional_threshold, self.max_failovers, self.max_prefill_retries) < 0:
            raise ValueError("conditional_threshold, max_failovers and max_prefill_retries must be >= 0")
        if self.kv_transfer not in KV_TRANSFER_MODES:
            raise ValueError(f"kv_transfer must be one of {KV_TRANSFER_MODES}, got {self.kv_transfer!r}")
        for name in ("default_max_tokens", "max_tokens_limit", "request_timeout_seconds", "prefill_timeout_seconds",
                     "membership_refresh_seconds", "health_timeout_seconds", "health_retry_max_seconds",
                     "failure_backoff_seconds"):
            check_positive(name, getattr(self, name))
        if self.failure_backoff_max_seconds < self.failure_backoff_seconds:
            raise ValueError("failure_backoff_max_seconds must be >= failure_backoff_seconds")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must be <= max_tokens_limit")
        check_log_level(self.log_level)

    def _check_addresses(self) -> None:
        """Each role needs the list, the file or both; without either it takes its default address."""
        for role, default in (("prefill", DEFAULT_PREFILL), ("decode", DEFAULT_DECODE)):
            listed, file = f"{role}_addresses", f"{role}_addresses_file"
            value, path = getattr(self, listed), getattr(self, file)
            if not value and not path:
                value = default
                setattr(self, listed, value)
            if value and not split_addresses(value):
                raise ValueError(f"{listed} must name at least one host:port worker, got {value!r}")
            check_address_list(listed, value)
            if path and not Path(path).is_file():
                raise ValueError(f"{file} {path!r} does not exist")

    @property
    def model_id(self) -> str:
        """The model's name in the HTTP API."""
        if self.served_model_name:
            return self.served_model_name
        return {"default": "SmolLM2-135M-Instruct", "tiny": "tiny-random-llama"}.get(
            self.model, Path(self.model).name)
