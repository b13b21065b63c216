"""Client of the kvstore service used by the workers, speaking domain errors."""

from __future__ import annotations

import grpc

from services.common.channel_factory import ChannelFactory
from services.common.channels import ChannelPool
from services.common.errors import BackendUnavailable, UnknownRequest
from services.common.pb import kvstore_pb2, kvstore_pb2_grpc


class KvStoreClient:
    """Puts, gets and deletes values in one namespace (normally the model fingerprint)."""

    def __init__(self, address: str, namespace: str, timeout_seconds: float, channels: ChannelFactory) -> None:
        self.address = address
        self._namespace = namespace
        self._timeout = timeout_seconds
        self._channels = ChannelPool(channels)  # a new channel when the TLS files rotate

    @property
    def _stub(self) -> kvstore_pb2_grpc.KvStoreServiceStub:
        return kvstore_pb2_grpc.KvStoreServiceStub(self._channels.get(self.address))

    def _translate(self, error: grpc.aio.AioRpcError, key: str) -> Exception:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return UnknownRequest(f"kvstore has no {key!r}")
        if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return BackendUnavailable(f"kvstore at {self.address} unavailable: {error.details()}")
        return error

    async def put(self, key: str, value: bytes, ttl_seconds: int = 0) -> None:
        request = kvstore_pb2.PutRequest(namespace=self._namespace, key=key, value=value, ttl_seconds=ttl_seconds)
        try:
            await self._stub.Put(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise self._translate(error, key) from error

    async def get(self, key: str) -> bytes:
        try:
            reply = await self._stub.Get(kvstore_pb2.GetRequest(namespace=self._namespace, key=key),
                                         timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise self._translate(error, key) from error
        return reply.value

    async def delete_prefix(self, prefix: str) -> int:
        try:
            reply = await self._stub.Delete(kvstore_pb2.DeleteRequest(namespace=self._namespace, prefix=prefix),
                                            timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise self._translate(error, prefix) from error
        return reply.deleted

    async def close(self) -> None:
        await self._channels.close()
