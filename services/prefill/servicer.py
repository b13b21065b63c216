"""Prefill gRPC servicer: protobuf in, domain job to the engine, protobuf events out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.common.channels import ChannelPool
from services.common.edge import grpc_edge
from services.common.errors import BackendUnavailable
from services.common.logs import request_id_var
from services.common.model_info import model_info_pb
from services.common.pb import common_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from services.common.runtime import ModelGeometry
from services.common.sampling import sampling_from_pb
from services.common.server import Lifecycle
from services.common.telemetry import ServiceTelemetry
from services.prefill.engine import FirstToken, PrefillEngine, PrefillJob
from services.prefill.sinks import DecodeStreamSink


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    """Serves once `ready` is set (after the model loaded); until then every call is UNAVAILABLE."""

    def __init__(self, telemetry: ServiceTelemetry, lifecycle: Lifecycle, channels: ChannelPool,
                 transfer_timeout_seconds: float) -> None:
        self.telemetry = telemetry
        self._lifecycle = lifecycle
        self._ready: tuple[PrefillEngine, common_pb2.ModelInfo] | None = None
        self._channels = channels
        self._transfer_timeout = transfer_timeout_seconds

    def ready(self, engine: PrefillEngine, geometry: ModelGeometry) -> None:
        self._ready = (engine, model_info_pb(geometry))

    def _state(self) -> tuple[PrefillEngine, common_pb2.ModelInfo]:
        if self._ready is None:
            raise BackendUnavailable("prefill worker is loading its model")
        return self._ready

    @grpc_edge
    async def Prefill(self, request: prefill_pb2.PrefillRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[prefill_pb2.PrefillEvent]:
        request_id_var.set(request.request_id)
        engine, _ = self._state()
        with self._lifecycle.work():
            async for event in self._prefill(engine, request):
                yield event

    async def _prefill(self, engine: PrefillEngine,
                       request: prefill_pb2.PrefillRequest) -> AsyncIterator[prefill_pb2.PrefillEvent]:
        sink = None
        if request.decode_address:
            stub = decode_pb2_grpc.DecodeServiceStub(self._channels.get(request.decode_address))
            sink = DecodeStreamSink(stub, self._transfer_timeout)
        job = PrefillJob(request.request_id, list(request.prompt_token_ids),
                         sampling_from_pb(request.sampling, default_max_tokens=16), sink, request.store_kv,
                         request.position_offset)
        async for event in engine.run(job):
            if isinstance(event, FirstToken):
                yield prefill_pb2.PrefillEvent(first_token=prefill_pb2.FirstToken(token_id=event.token_id))
            else:
                yield prefill_pb2.PrefillEvent(done=prefill_pb2.PrefillDone(
                    kv_bytes=event.kv_bytes, chunk_count=event.chunk_count, forward_seconds=event.forward_seconds,
                    transfer_seconds=event.transfer_seconds, handoff_seconds=event.handoff_seconds,
                    stored=event.stored))

    @grpc_edge
    async def GetModelInfo(self, request: common_pb2.ModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> common_pb2.ModelInfo:
        return self._state()[1]

    @grpc_edge
    async def Stats(self, request: common_pb2.StatsRequest,
                    context: grpc.aio.ServicerContext) -> prefill_pb2.PrefillStats:
        engine, info = self._state()
        held = engine.kv_bytes_held
        return prefill_pb2.PrefillStats(active_requests=len(held), kv_bytes_held=sum(held.values()),
                                        requests_total=engine.requests_total, model=info)
