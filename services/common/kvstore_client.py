"""Client of the kvstore service used by the workers, speaking domain errors.

`address` may list several kvstores (comma separated, all on one backend such as a shared Redis):
then one round-robin channel spreads the calls over those whose health is SERVING
(services/common/targets.py), and a call that fails with UNAVAILABLE (a kvstore that drains after
SIGTERM, restarts or is down, or none reachable for a moment: the channel reconnects to a
restarted kvstore within a second) is tried again, with backoff, for up to `RETRY_WINDOW_SECONDS`
(within the call's own deadline). Every call is idempotent (a put of the same value, a get, a
delete), so a retry never changes what is stored. With one address a call is tried once.

Reads on the kvstore's host: every Get names this process's host identity; a kvstore on the same
host whose backend keeps values in shared memory (`--backend shm`) answers with the value's segment
and length, and the bytes are read straight from /dev/shm (the segment must hold exactly that many
bytes, else DATA_LOSS; a segment already gone means the value was deleted or evicted: NOT_FOUND).
A segment this process cannot read (another user's, say) is read over gRPC instead."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from services.common import shm
from services.common.backoff import Backoff
from services.common.channel_factory import ChannelFactory
from services.common.channels import ChannelPool
from services.common.errors import BackendUnavailable, KvCorrupted, UnknownRequest, call_status
from services.common.pb import kvstore_pb2, kvstore_pb2_grpc
from services.common.targets import address_list

log = logging.getLogger(__name__)

R = TypeVar("R")
RETRY_WINDOW_SECONDS = 3.0  # three times the longest reconnect interval of a channel (1 s)
RETRY_BACKOFF = Backoff(0.05, 0.5)


class KvStoreClient:
    """Puts, gets and deletes values in one namespace (normally the model fingerprint)."""

    def __init__(self, address: str, namespace: str, timeout_seconds: float, channels: ChannelFactory,
                 shared_memory_reads: bool = True) -> None:
        self.address = address
        self._host_identity = shm.host_identity() if shared_memory_reads else ""
        self._namespace = namespace
        self._timeout = timeout_seconds
        self._channels = ChannelPool(channels)  # a new channel when the TLS files rotate
        self._window = min(RETRY_WINDOW_SECONDS, timeout_seconds) if len(address_list(address)) > 1 else 0.0

    @property
    def _stub(self) -> kvstore_pb2_grpc.KvStoreServiceStub:
        return kvstore_pb2_grpc.KvStoreServiceStub(self._channels.get(self.address))

    def _translate(self, error: grpc.aio.AioRpcError, key: str) -> Exception:
        code, details = call_status(error)
        if code == grpc.StatusCode.NOT_FOUND:
            return UnknownRequest(f"kvstore has no {key!r}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return BackendUnavailable(f"kvstore at {self.address} unavailable: {details}")
        return error

    async def _call(self, call: Callable[[kvstore_pb2_grpc.KvStoreServiceStub], Awaitable[R]], key: str) -> R:
        """`call` on the stub, tried again on UNAVAILABLE within the retry window (several kvstores)."""
        give_up, attempt = time.monotonic() + self._window, 0
        while True:
            try:
                return await call(self._stub)
            except grpc.aio.AioRpcError as error:
                delay = RETRY_BACKOFF.delay(attempt)
                if call_status(error)[0] != grpc.StatusCode.UNAVAILABLE or time.monotonic() + delay > give_up:
                    raise self._translate(error, key) from error
            await asyncio.sleep(delay)
            attempt += 1

    async def put(self, key: str, value: bytes, ttl_seconds: int = 0) -> None:
        request = kvstore_pb2.PutRequest(namespace=self._namespace, key=key, value=value, ttl_seconds=ttl_seconds)
        await self._call(lambda stub: stub.Put(request, timeout=self._timeout), key)

    async def get(self, key: str) -> bytes:
        reply = await self._get(key, self._host_identity)
        if not reply.HasField("shm"):
            return reply.value
        try:
            return await read_shared(reply.shm, key)
        except OSError as error:  # not a missing segment (that is UnknownRequest): bytes instead
            if isinstance(error, PermissionError):
                self._host_identity = ""  # another user's segments: never readable here
            log.warning("cannot read %r from shared memory (%s): reading it over gRPC", key, error)
            return (await self._get(key, "")).value

    async def _get(self, key: str, host_identity: str) -> kvstore_pb2.GetReply:
        request = kvstore_pb2.GetRequest(namespace=self._namespace, key=key, host_identity=host_identity)
        return await self._call(lambda stub: stub.Get(request, timeout=self._timeout), key)

    async def delete_prefix(self, prefix: str) -> int:
        request = kvstore_pb2.DeleteRequest(namespace=self._namespace, prefix=prefix)
        reply = await self._call(lambda stub: stub.Delete(request, timeout=self._timeout), prefix)
        return reply.deleted

    async def close(self) -> None:
        await self._channels.close()


async def read_shared(location: kvstore_pb2.ShmValue, key: str) -> bytes:
    """The value of `key` where a Get reply says it lies in shared memory (UnknownRequest: gone
    before it was read; KvCorrupted: the segment does not hold a value of that length; OSError:
    it cannot be read here, e.g. PermissionError)."""
    try:
        return await shm.off_loop(location.length, shm.read_segment, location.segment, location.length)
    except FileNotFoundError:
        raise UnknownRequest(f"kvstore has no {key!r} (deleted or evicted before it was read)") from None
    except ValueError as error:
        raise KvCorrupted(f"kvstore value {key!r}: {error}") from None
