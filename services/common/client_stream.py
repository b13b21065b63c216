"""A client-streaming call's status as its server gave it.

grpc.aio loses it in one race (grpc/grpc#36066; the fix, grpc/grpc#43486, is not in grpcio 1.85):
when the server ends such a call early (refusing a KV transfer, say) while the client is still
writing, the next write fails, and grpc.aio sets the call's status to INTERNAL "Internal error from
Core". Whenever the event loop handles that failed write after the server's status has arrived, it
overwrites it: the caller sees INTERNAL instead of the server's code and details. `ServerStatus`
keeps the first status the call is given and hands it back where grpc's is that stand-in.
"""

from __future__ import annotations

import grpc

STAND_IN_DETAILS = "Internal error from Core"
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class ServerStatus:
    """Watches one client-streaming call from its start (create it right after the call)."""

    def __init__(self, call: grpc.aio.Call) -> None:
        self._first: tuple[grpc.StatusCode, str] | None = None
        call.add_done_callback(self._record)  # grpc calls it at every status it sets, the first one included

    def _record(self, call: grpc.aio.Call) -> None:
        if self._first is not None:
            return
        status = getattr(getattr(call, "_cython_call", None), "_status", None)  # grpc.aio keeps it privately
        if status is not None:
            self._first = (_CODES.get(int(status.code()), grpc.StatusCode.UNKNOWN), status.details())

    def error(self, error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
        """`error`, or the server's own status where `error` is grpc's stand-in for it."""
        first = self._first
        if (error.code() == grpc.StatusCode.INTERNAL and error.details() == STAND_IN_DETAILS
                and first is not None and first[1] != STAND_IN_DETAILS):
            return grpc.aio.AioRpcError(first[0], grpc.aio.Metadata(), grpc.aio.Metadata(), first[1])
        return error
