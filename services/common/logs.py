"""One log format for every service, with the request id and trace id of the current request on
each line."""

from __future__ import annotations

import contextvars
import logging
import sys

from opentelemetry import trace

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def request_tag(internal_id: str, label: str) -> str:
    """How a request appears in log lines: the client's label (if any) and the internal id."""
    return f"{label}/{internal_id}" if label and label != internal_id else internal_id

LOG_FORMAT = "%(asctime)s %(levelname)s %(service)s [req=%(request_id)s trace=%(trace_id)s] %(name)s: %(message)s"


class _ContextFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.service = self._service
        span_context = trace.get_current_span().get_span_context()
        record.trace_id = format(span_context.trace_id, "032x") if span_context.is_valid else "-"
        return True


def setup_logging(service: str, level: str) -> None:
    """Route every logger to stderr in LOG_FORMAT at `level` (DEBUG, INFO, WARNING, ERROR)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_ContextFilter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("transformers", "accelerate", "urllib3", "filelock", "grpc._cython"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def check_log_level(level: str) -> None:
    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
