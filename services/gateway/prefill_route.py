"""A request's prefill: the least loaded serving prefill worker, and another one when it fails.

A prefill call that fails with UNAVAILABLE or DEADLINE_EXCEEDED (each call has its own deadline,
`--prefill-timeout-seconds`, bounding forward pass + KV transfer) is the prefill worker's fault,
unless the prefill says another role caused it (trailing metadata `disagg-fault-role`: `decode`,
`kvstore`) or the decode admission it feeds has already ended. INTERNAL is not retried: a prompt
that breaks the model would break every worker in turn. A prefill fault reports the worker (it is
skipped with backoff) and the prefill runs again on another worker (at most
`--max-prefill-retries` times) for the same decode admission, with `transfer_attempt` counting
the retries. The first token is passed on once: a retry is given it (`known_first_token`), so
the decode continues from exactly the token the client has.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import grpc
from opentelemetry import trace
from prometheus_client import Counter

from services.common.channels import ChannelPool
from services.common.errors import FAULT_ROLE_KEY, BackendUnavailable, call_status
from services.common.pb import prefill_pb2, prefill_pb2_grpc
from services.gateway.prefix_route import PrefixAffinity
from services.gateway.routing import Worker, WorkerPool

log = logging.getLogger(__name__)

_PREFILL_FAULTS = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def fault_role(error: grpc.aio.AioRpcError) -> str:
    """The role a worker's error names as its cause (trailing metadata `disagg-fault-role`), or ''."""
    for key, value in error.trailing_metadata() or ():
        if key == FAULT_ROLE_KEY:
            return value.decode() if isinstance(value, bytes) else value
    return ""


def is_prefill_fault(error: grpc.aio.AioRpcError, decode_call: grpc.aio.Call | None = None) -> bool:
    """Whether a failed prefill call is the prefill worker's own failure (see the module doc)."""
    if call_status(error)[0] not in _PREFILL_FAULTS or fault_role(error) not in ("", "prefill"):
        return False
    return decode_call is None or not decode_call.done()


class PrefillRoute:
    def __init__(self, pool: WorkerPool, channels: ChannelPool, timeout_seconds: float, max_retries: int,
                 retries: Counter, affinity: PrefixAffinity | None = None) -> None:
        self._pool = pool
        self._channels = channels
        self._timeout = timeout_seconds
        self._max_retries = max_retries
        self._retries = retries
        self._affinity = affinity  # cache-aware choice (None: least loaded)

    @property
    def attempts(self) -> int:
        """Prefill calls one decode admission may take (transfer attempts it numbers)."""
        return self._max_retries + 1

    async def events(self, request: prefill_pb2.PrefillRequest, calls: list[grpc.aio.Call],
                     decode_call: grpc.aio.Call | None, first_attempt: int,
                     keys: Sequence[str]) -> AsyncIterator[prefill_pb2.PrefillEvent]:
        """The prefill's events (the first token once, then the summary), moving to another worker
        when one fails. `calls` collects the calls for the caller to cancel; `decode_call` is the
        decode admission the KV goes to; transfer attempts are numbered from `first_attempt` (so a
        failover's transfers never reuse an earlier admission's numbers, or its kvstore keys);
        `keys` are the prompt's block names for routing (empty without prefix routing)."""
        tried: list[str] = []
        last_error = BackendUnavailable("no prefill worker took the request")
        for attempt in range(self._max_retries + 1):
            worker = self._choose(tried, keys)
            if worker is None:
                break
            if attempt:
                self._retried(worker, tried, attempt)
            request.transfer_attempt = first_attempt + attempt
            try:
                with WorkerPool.lease(worker):
                    async for event in self._call(worker, request, calls):
                        if event.HasField("first_token"):
                            if self._affinity is not None and event.first_token.choice == 0:
                                self._affinity.record(worker.address, keys)  # it computed (and keeps) them
                            if not _remember_first_token(request, event.first_token):
                                continue
                        yield event
                return
            except grpc.aio.AioRpcError as error:
                if not is_prefill_fault(error, decode_call):
                    raise
                tried.append(worker.address)
                self._pool.report_failure(worker.address, "Prefill {}: {}".format(*call_status(error)))
                last_error = error
        raise _exhausted(tried, last_error)

    def _choose(self, tried: list[str], keys: Sequence[str]) -> Worker | None:
        """The serving worker this request has not tried with the least of the prompt left to
        compute and the least load (services/gateway/prefix_route.py; without the record: the least
        loaded); None when there is no other one for a retry (the first try raises
        BackendUnavailable naming the role)."""
        try:
            untried = [w for w in self._pool.ranked() if w.address not in tried]
        except BackendUnavailable:
            if not tried:
                raise
            return None
        worker = None
        if untried:
            worker = untried[0] if self._affinity is None or not keys else self._affinity.choose(untried, keys)
        if worker is not None:
            trace.get_current_span().set_attribute("gateway.prefill_worker", worker.address)
        return worker

    def _call(self, worker: Worker, request: prefill_pb2.PrefillRequest,
              calls: list[grpc.aio.Call]) -> grpc.aio.UnaryStreamCall:
        stub = prefill_pb2_grpc.PrefillServiceStub(self._channels.get(worker.address))
        call = stub.Prefill(request, timeout=self._timeout)
        calls.append(call)
        return call

    def _retried(self, worker: Worker, tried: list[str], attempt: int) -> None:
        self._retries.inc()
        log.warning("prefill failed on %s; retry %d on %s", tried[-1], attempt, worker.address)
        trace.get_current_span().add_event("gateway.prefill_retry", {
            "prefill.failed_worker": tried[-1], "prefill.worker": worker.address, "prefill.attempt": attempt})


def _remember_first_token(request: prefill_pb2.PrefillRequest, first: prefill_pb2.FirstToken) -> bool:
    """Whether this first token is news to the client; a retry must continue from the tokens the
    client already has (choices come in order: choice 0 is known_first_token, then the others)."""
    known = request.HasField("known_first_token") + len(request.known_choice_first_tokens)
    if first.choice < known:
        return False
    if first.choice == 0:
        request.known_first_token = first.token_id
    else:
        request.known_choice_first_tokens.append(first.token_id)
    return True


def _exhausted(tried: list[str], error: grpc.aio.AioRpcError | BackendUnavailable) -> Exception:
    """What the client gets when every try failed: UNAVAILABLE naming the workers and the last error."""
    if not isinstance(error, grpc.aio.AioRpcError):
        return error
    code, details = call_status(error)
    return BackendUnavailable(f"prefill failed on {len(tried)} worker(s) ({', '.join(tried)}); last error "
                              f"{code.name}: {details}")
