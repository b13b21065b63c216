"""Domain errors and the one table that maps them to gRPC status codes.

Code inside a service raises these; only the servicer edge (`services.common.edge.grpc_edge`)
turns them into a gRPC status. Errors from an upstream gRPC call keep their code as they pass
through (`call_status`: but for a call a server dropped as it shut down, which reads as UNAVAILABLE).
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base of every error a client may be told about."""


class InvalidRequest(ServiceError):
    """The caller sent a bad value; the message names the field."""


class KvProtocolError(ServiceError):
    """A KV transfer message is malformed, out of order, duplicated, mis-shaped or oversized."""


class KvCorrupted(ServiceError):
    """KV bytes do not match their checksum, or chunks are missing."""


class ModelMismatch(ServiceError):
    """Two workers (or a worker and stored KV) run different models."""


class UnknownRequest(ServiceError):
    """No request or key by that name."""


class CapacityExhausted(ServiceError):
    """No room for more work right now."""


class BackendUnavailable(ServiceError):
    """A service or store this request needs cannot be reached."""


class DeadlineExceeded(ServiceError):
    """A wait ran out of time."""


class Unauthenticated(ServiceError):
    """The caller gave no API key, or a wrong one."""


class AlreadyExists(ServiceError):
    """A request with this id is already live on this worker."""


class RequestCancelled(ServiceError):
    """The request was cancelled, or its KV superseded, while this call was still working for it;
    what the call carried was dropped."""


class TransportUnavailable(ServiceError):
    """The KV transport asked for cannot be used between these two workers (shared memory with a
    decode worker on another host, or one that refuses it)."""


class InternalFailure(ServiceError):
    """Something broke inside this worker (a failed decode step); the message names the cause."""


class UpstreamError(ServiceError):
    """Another worker failed a call this one made on the request's behalf. Carries that worker's
    status code, and its role so the gateway knows whose fault it was (trailing metadata
    `disagg-fault-role`)."""

    def __init__(self, code: grpc.StatusCode, details: str, role: str) -> None:
        super().__init__(f"{role} worker: {details}")
        self.code = code
        self.role = role


STATUS_BY_ERROR: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    KvProtocolError: grpc.StatusCode.INVALID_ARGUMENT,
    KvCorrupted: grpc.StatusCode.DATA_LOSS,
    ModelMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    UnknownRequest: grpc.StatusCode.NOT_FOUND,
    CapacityExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    RequestCancelled: grpc.StatusCode.CANCELLED,
    InternalFailure: grpc.StatusCode.INTERNAL,
    TransportUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
}
FAULT_ROLE_KEY = "disagg-fault-role"  # trailing metadata: which worker's fault an error was


# grpc core ends a call that reached a server but that no handler had taken yet, when the server
# shuts down, with CANCELLED and these details (grpc/grpc#41785); a stream reset by the server side
# reads the same. A caller's own cancel never comes back to it as a status ("Locally cancelled by
# application!"), and this project's handlers always give their reason.
DROPPED_AT_SHUTDOWN_DETAILS = "CANCELLED"


def call_status(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """A failed call's status code and details, with one reading: a call the server side dropped
    (as it shut down) is UNAVAILABLE, like any call to a server that went away, and retried as one
    (every retry in this project is safe after a handler ran too). Empty details are never passed
    on as the dropped call's."""
    code, details = error.code(), error.details() or ""  # type: ignore[attr-defined]
    if code == grpc.StatusCode.CANCELLED and details == DROPPED_AT_SHUTDOWN_DETAILS:
        return grpc.StatusCode.UNAVAILABLE, "the server shut down before it took the call"
    return code, details or f"{code.name} (no details)"


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a client should get for `error`."""
    if isinstance(error, grpc.aio.AioRpcError):
        return call_status(error)
    if isinstance(error, UpstreamError):
        return error.code, str(error)
    for kind, code in STATUS_BY_ERROR.items():
        if isinstance(error, kind):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}"
