"""kvstore gRPC servicer: validates requests and hands them to the backend.

Life of a value: Put (validated: namespace and key; evicts oldest entries to fit the budget) ->
stored until its TTL passes, it is evicted, or Delete removes it (by key or prefix) -> Get
returns it meanwhile, NOT_FOUND after. A Get from a reader on this host (its host identity equals
this kvstore's) of a value the backend keeps in shared memory returns where it lies instead of the
bytes; every other Get returns the bytes.
"""

from __future__ import annotations

import re

import grpc

from services.common.edge import grpc_edge
from services.common.errors import InvalidRequest
from services.common.pb import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from services.common.server import Lifecycle
from services.common.telemetry import ServiceTelemetry
from services.kvstore.backend import KvBackend, ValueLocation

_NAME = re.compile(r"^[\x21-\x7e]{1,512}$")  # printable ASCII, no spaces or newlines


def _check_name(field: str, value: str) -> None:
    if not _NAME.match(value):
        raise InvalidRequest(f"{field} must be 1-512 printable ASCII characters without spaces, got {value!r}")


class KvStoreServicer(kvstore_pb2_grpc.KvStoreServiceServicer):
    def __init__(self, telemetry: ServiceTelemetry, lifecycle: Lifecycle, backend: KvBackend,
                 default_ttl_seconds: float, host_identity: str) -> None:
        self.telemetry = telemetry
        self.lifecycle = lifecycle
        self._backend = backend
        self._default_ttl = default_ttl_seconds
        self._host_identity = host_identity  # services/common/shm.host_identity() of this process
        self._shm_gets = 0

    @grpc_edge(new_work=True)
    async def Put(self, request: kvstore_pb2.PutRequest, context: grpc.aio.ServicerContext) -> kvstore_pb2.PutReply:
        _check_name("namespace", request.namespace)
        _check_name("key", request.key)
        ttl = request.ttl_seconds or self._default_ttl
        evicted = await self._backend.put(request.namespace, request.key, request.value, ttl)
        return kvstore_pb2.PutReply(evicted=evicted)

    @grpc_edge(new_work=True)
    async def Get(self, request: kvstore_pb2.GetRequest, context: grpc.aio.ServicerContext) -> kvstore_pb2.GetReply:
        _check_name("namespace", request.namespace)
        _check_name("key", request.key)
        if request.host_identity and request.host_identity == self._host_identity:
            location = await self._backend.locate(request.namespace, request.key)
            if location is not None:
                self._shm_gets += 1
                return kvstore_pb2.GetReply(shm=_shm_value(location))
        return kvstore_pb2.GetReply(value=await self._backend.get(request.namespace, request.key))

    @grpc_edge(new_work=True)
    async def Delete(self, request: kvstore_pb2.DeleteRequest,
                     context: grpc.aio.ServicerContext) -> kvstore_pb2.DeleteReply:
        _check_name("namespace", request.namespace)
        for key in request.keys:
            _check_name("key", key)
        deleted = await self._backend.delete(request.namespace, list(request.keys), request.prefix)
        return kvstore_pb2.DeleteReply(deleted=deleted)

    @grpc_edge(new_work=False)
    async def Stats(self, request: common_pb2.StatsRequest,
                    context: grpc.aio.ServicerContext) -> kvstore_pb2.KvStoreStats:
        stats = await self._backend.stats()
        return kvstore_pb2.KvStoreStats(backend=stats.backend, entries=stats.entries, bytes_used=stats.bytes_used,
                                        byte_budget=stats.byte_budget, evictions_total=stats.evictions_total,
                                        shm_gets_total=self._shm_gets)


def _shm_value(location: ValueLocation) -> kvstore_pb2.ShmValue:
    return kvstore_pb2.ShmValue(segment=location.segment, length=location.length)
