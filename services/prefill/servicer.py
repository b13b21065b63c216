"""Prefill gRPC servicer: protobuf in, domain job to the engine, protobuf events out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from services.common.channels import ChannelPool
from services.common.edge import grpc_edge
from services.common.errors import BackendUnavailable, InvalidRequest
from services.common.kv_shm import ShmTransport
from services.common.logs import request_id_var, request_tag
from services.common.model_info import model_info_pb
from services.common.kv_wire import transfer_kv_bytes
from services.common.pb import common_pb2, prefill_pb2, prefill_pb2_grpc
from services.common.runtime import ModelGeometry
from services.common import logprobs
from services.common.sampling import sampling_from_pb
from services.common.server import Lifecycle
from services.common.telemetry import ServiceTelemetry
from services.common.prefix_keys import check_salt
from services.common.validation import check_id
from services.prefill.engine import FirstToken, PrefillEngine, PrefillJob
from services.prefill.shm_sink import ShmStreamSink
from services.prefill.sinks import DecodeStreamSink


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    """Serves once `ready` is set (after the model loaded); until then every call is UNAVAILABLE."""

    def __init__(self, telemetry: ServiceTelemetry, lifecycle: Lifecycle, channels: ChannelPool,
                 transfer_timeout_seconds: float, shm_transport: ShmTransport | None = None) -> None:
        self.telemetry = telemetry
        self.lifecycle = lifecycle
        self._ready: tuple[PrefillEngine, common_pb2.ModelInfo] | None = None
        self._channels = channels
        self._transfer_timeout = transfer_timeout_seconds
        self._shm = shm_transport  # None or mode grpc: chunks inline
        self.shm_transfers_total = 0

    def ready(self, engine: PrefillEngine, geometry: ModelGeometry) -> None:
        self._ready = (engine, model_info_pb(geometry))

    def _state(self) -> tuple[PrefillEngine, common_pb2.ModelInfo]:
        if self._ready is None:
            raise BackendUnavailable("prefill worker is loading its model")
        return self._ready

    @property
    def active_requests(self) -> int:
        return len(self._ready[0].kv_bytes_held) if self._ready else 0

    @grpc_edge(new_work=True)
    async def Prefill(self, request: prefill_pb2.PrefillRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[prefill_pb2.PrefillEvent]:
        request_id_var.set(request_tag(request.request_id, request.client_request_id))
        trace.get_current_span().set_attributes({"request.id": request.request_id,
                                                 "request.label": request.client_request_id,
                                                 "kv.transfer_attempt": request.transfer_attempt})
        engine, _ = self._state()
        check_id("client_request_id", request.client_request_id, required=False)
        if not request.decode_address:
            raise InvalidRequest("decode_address must name the decode worker that admitted the request")
        sampling = sampling_from_pb(request.sampling, default_max_tokens=16)
        transfer_kv = transfer_kv_bytes(self._channels.get(request.decode_address))
        sink = self._decode_sink(transfer_kv, request.store_kv, request.decode_kv_shm_host)
        job = PrefillJob(request.request_id, list(request.prompt_token_ids), sampling, sink, request.store_kv,
                         request.position_offset, request.transfer_attempt,
                         request.known_first_token if request.HasField("known_first_token") else None,
                         tuple(request.known_choice_first_tokens), check_salt(request.cache_salt),
                         request.decode_cached_tokens, sink.chunk_tokens())
        async for event in engine.run(job):
            if isinstance(event, FirstToken):
                yield prefill_pb2.PrefillEvent(first_token=_first_token_pb(event))
            else:
                if sink.transport == "shm":
                    self.shm_transfers_total += 1
                yield prefill_pb2.PrefillEvent(done=prefill_pb2.PrefillDone(
                    kv_bytes=event.kv_bytes, chunk_count=event.chunk_count, forward_seconds=event.forward_seconds,
                    transfer_seconds=event.transfer_seconds, handoff_seconds=event.handoff_seconds,
                    stored=event.stored, kv_transport="" if request.store_kv else sink.transport,
                    cached_tokens=event.cached_tokens))

    def _decode_sink(self, transfer_kv: grpc.aio.StreamUnaryMultiCallable, store_kv: bool,
                     decode_host: str) -> DecodeStreamSink:
        if store_kv or self._shm is None or self._shm.mode == "grpc":
            return DecodeStreamSink(transfer_kv, self._transfer_timeout, chunks=not store_kv)
        return ShmStreamSink(transfer_kv, self._transfer_timeout, self._shm, decode_host)

    @grpc_edge(new_work=False)
    async def GetModelInfo(self, request: common_pb2.ModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> common_pb2.ModelInfo:
        return self._state()[1]

    @grpc_edge(new_work=False)
    async def Stats(self, request: common_pb2.StatsRequest,
                    context: grpc.aio.ServicerContext) -> prefill_pb2.PrefillStats:
        engine, info = self._state()
        held = engine.kv_bytes_held
        prefix = engine.prefix
        return prefill_pb2.PrefillStats(active_requests=len(held), kv_bytes_held=sum(held.values()),
                                        requests_total=engine.requests_total, model=info,
                                        shm_transfers_total=self.shm_transfers_total,
                                        prefix_lookup_tokens_total=prefix.lookup_tokens if prefix else 0,
                                        prefix_hit_tokens_total=prefix.hit_tokens if prefix else 0,
                                        prefix_cache_blocks=prefix.blocks if prefix else 0)


def _first_token_pb(event: FirstToken) -> prefill_pb2.FirstToken:
    return prefill_pb2.FirstToken(token_id=event.token_id, ends_output=event.ends_output, choice=event.choice,
                                  **logprobs.token_fields(event.logprob, event.prompt_logprobs))
