"""Decode gRPC servicer: protobuf at the edge, the DecodeEngine inside."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from services.common.edge import grpc_edge
from services.common.errors import BackendUnavailable, InvalidRequest, KvCorrupted, KvProtocolError, RequestCancelled
from services.common.kv_codec import KvChunk, KvEnd, KvLayout
from services.common.kv_assembly import KvAssembler, KvReceipt
from services.common.kv_shm import ShmReceiver
from services.common import logprobs
from services.common.kv_wire import parse_wire, transfer_prefix
from services.common.logs import request_id_var, request_tag
from services.common.model_info import model_info_pb
from services.common.pb import common_pb2, decode_pb2, decode_pb2_grpc
from services.common.runtime import ModelGeometry
from services.common.sampling import sampling_from_pb
from services.common.server import Lifecycle
from services.common.telemetry import ServiceTelemetry
from services.decode.engine import FINISH_LENGTH, DecodeEngine
from services.decode.ingest_queue import IngestQueue
from services.decode.sequence import Finished, Sequence, Token

tracer = trace.get_tracer("disagg.decode")
_FINISH_PB = {"stop": common_pb2.FINISH_REASON_STOP, FINISH_LENGTH: common_pb2.FINISH_REASON_LENGTH}
# TransferKv's messages arrive as raw bytes (see add_to_server) and are parsed by kv_wire.parse_wire.
TransferStream = AsyncIterator[bytes]
# A sender that cancels or dies looks, at first, like one that closed its stream early: gRPC ends
# the message stream, and cancels this handler a moment later. Waiting this long before calling it
# a broken transfer lets the request keep waiting for a retried transfer instead.
SENDER_GONE_GRACE_SECONDS = 0.5


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    """Serves once `ready` is set (after the model loaded); until then every call is UNAVAILABLE."""

    def __init__(self, telemetry: ServiceTelemetry, lifecycle: Lifecycle, shm_host: str = "") -> None:
        self.telemetry = telemetry
        self.lifecycle = lifecycle
        self._shm_host = shm_host  # this host's identity when shared-memory transfers are accepted
        self._ready: tuple[DecodeEngine, common_pb2.ModelInfo] | None = None

    def ready(self, engine: DecodeEngine, geometry: ModelGeometry) -> None:
        self._ready = (engine, model_info_pb(geometry))

    def _state(self) -> tuple[DecodeEngine, common_pb2.ModelInfo]:
        if self._ready is None:
            raise BackendUnavailable("decode worker is loading its model")
        return self._ready

    @grpc_edge(new_work=True)
    async def Generate(self, request: decode_pb2.DecodeRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[decode_pb2.DecodeEvent]:
        request_id_var.set(request_tag(request.request_id, request.client_request_id))
        trace.get_current_span().set_attributes({"request.id": request.request_id,
                                                 "request.label": request.client_request_id})
        engine, _ = self._state()
        if request.kv_source not in decode_pb2.KvSource.values():
            raise InvalidRequest(f"kv_source {request.kv_source} is not one of {list(decode_pb2.KvSource.keys())}")
        sequence = engine.admit(Sequence(
            request.request_id, list(request.prompt_token_ids), sampling_from_pb(request.sampling, 16),
            request.position_offset, engine.budget_bytes(request.max_cache_budget_mb), request.client_request_id,
            cache_salt=request.cache_salt, prefilled_here=request.kv_source == decode_pb2.KV_SOURCE_LOCAL))
        try:
            # Compiled once admitted (a full pool refuses first) and before Accepted: no KV, so no
            # first token, can arrive before the grammar is there.
            await engine.compile_grammar(sequence)
            yield decode_pb2.DecodeEvent(accepted=decode_pb2.Accepted(kv_shm_host=self._shm_host,
                                                                      cached_tokens=sequence.cached_tokens))
            if request.kv_source == decode_pb2.KV_SOURCE_LOCAL:
                engine.prefill_locally(sequence)
            # closed here if this stream is closed, before the release below
            async with aclosing(self._generation(engine, sequence)) as events:
                async for event in events:
                    yield event
        finally:
            engine.release(sequence)

    @staticmethod
    async def _generation(engine: DecodeEngine, sequence: Sequence) -> AsyncGenerator[decode_pb2.DecodeEvent, None]:
        # Started, not made current: a context attached across these yields could not be detached
        # when the stream is abandoned at one and closed from another task (see `edge`).
        span = tracer.start_span("decode.generation")
        try:
            started, tokens = time.perf_counter(), 0
            async for event in engine.events(sequence):
                if isinstance(event, Finished):
                    span.set_attributes({"decode.tokens": event.completion_tokens,
                                         "decode.finish_reason": event.reason,
                                         "decode.time_per_output_token_ms":
                                             (time.perf_counter() - started) * 1e3 / max(tokens, 1)})
                    yield decode_pb2.DecodeEvent(finished=decode_pb2.DecodeFinished(
                        reason=_FINISH_PB[event.reason], completion_tokens=event.completion_tokens,
                        choice=event.choice))
                else:
                    tokens += 1
                    yield decode_pb2.DecodeEvent(token=_token_pb(event))
        except Exception as error:  # as start_as_current_span would (not for a cancel or a close)
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            raise
        finally:
            span.end()

    @grpc_edge(new_work=False)  # part of an admitted request's work: accepted while draining
    async def TransferKv(self, request_iterator: TransferStream,
                         context: grpc.aio.ServicerContext) -> decode_pb2.TransferKvReply:
        engine, _ = self._state()
        messages = aiter(request_iterator)
        layout = parse_wire(await anext(messages, b""))
        if not isinstance(layout, KvLayout):
            raise KvProtocolError("KV transfer must start with a layout")
        request_id_var.set(layout.request_id)
        sequence, assembler = engine.begin_transfer(layout)
        lease = sequence.lease
        try:
            if layout.chunks_in_kvstore:
                receipt = await self._load_announced(engine, layout, messages, assembler)
            else:
                chunk_bytes = ShmReceiver(layout, accept_shm=bool(self._shm_host))
                # Unmapped once the RPC ended, its reply gone: a few ms of work off the handoff.
                context.add_done_callback(lambda _: chunk_bytes.release())
                receipt = await self._receive(layout, messages, assembler, chunk_bytes)
            engine.complete(sequence, lease, receipt)  # type: ignore[arg-type]
        except (asyncio.CancelledError, RequestCancelled):
            # The sender vanished (a retry may follow; the KV deadline bounds the wait), or the
            # request is gone or superseded: nothing to fail.
            raise
        except Exception as error:
            failure = engine.transfer_failed(sequence, lease, error)  # type: ignore[arg-type]
            if failure is error:
                raise
            raise failure from error
        trace.get_current_span().set_attributes({"kv.bytes": assembler.bytes_received,
                                                 "kv.chunks": assembler.next_index})
        return decode_pb2.TransferKvReply(bytes_received=assembler.bytes_received,
                                          chunks_received=assembler.next_index)

    @staticmethod
    async def _receive(layout: KvLayout, messages: TransferStream, assembler: KvAssembler,
                       chunk_bytes: ShmReceiver) -> KvReceipt:
        """Chunks are parsed and admitted here, in arrival order; their checksum, finiteness check
        and pool write run in order in one worker thread (IngestQueue) while the next chunks are
        received. A chunk's failure comes before any later message's own."""
        assembler.accept_layout(layout)
        chunk_bytes.map_ahead()
        ingest = IngestQueue(assembler)
        chunk_bytes.add_reader(ingest.finished)  # the segment stays mapped while the thread may read it
        try:
            async for raw in messages:
                message = chunk_bytes.resolve(parse_wire(raw))  # an shm slice becomes its mapped bytes
                if isinstance(message, KvChunk):
                    await ingest.put(message, assembler.admit_chunk(message))
                elif isinstance(message, KvEnd):
                    await ingest.close()
                    return assembler.finish(message)
                else:
                    raise KvProtocolError("KV layout sent twice")
            await ingest.close()
        except Exception:
            await ingest.close()  # an earlier chunk's failure, if any, is the transfer's
            raise
        finally:
            ingest.close(stop=True).add_done_callback(_consume)  # cancelled or failed: drop the rest
        await asyncio.sleep(SENDER_GONE_GRACE_SECONDS)  # a sender that went away is cancelled meanwhile
        assembler.check_complete()
        raise KvCorrupted("KV transfer ended without its end message")

    @staticmethod
    async def _load_announced(engine: DecodeEngine, layout: KvLayout, messages: TransferStream,
                              assembler: KvAssembler) -> KvReceipt:
        """The stream announces KV the prefill stored in the kvstore: its end says all of it is
        there; the chunks are loaded and verified like streamed ones."""
        raw = await anext(messages, None)
        if raw is None:
            await asyncio.sleep(SENDER_GONE_GRACE_SECONDS)  # as in _receive
            raise KvCorrupted("KV transfer ended without its end message")
        if not isinstance(parse_wire(raw), KvEnd):
            raise KvProtocolError("a KV transfer announced in the kvstore carries only its layout and end")
        return await engine.swapper.load(transfer_prefix(layout.request_id, layout.transfer_attempt), assembler)

    @grpc_edge(new_work=False)
    async def GetModelInfo(self, request: common_pb2.ModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> common_pb2.ModelInfo:
        return self._state()[1]

    @grpc_edge(new_work=False)
    async def Stats(self, request: common_pb2.StatsRequest,
                    context: grpc.aio.ServicerContext) -> decode_pb2.DecodeStats:
        engine, info = self._state()
        load, blocks = engine.load(), engine.blocks
        return decode_pb2.DecodeStats(active_requests=load.active, awaiting_kv=load.awaiting_kv,
                                      kv_bytes_held=load.kv_bytes_held, requests_total=engine.requests_total,
                                      model=info, blocks_used=blocks.used, blocks_total=blocks.total,
                                      block_size=blocks.block_size, kv_pool_pressure=load.pressure,
                                      running=load.running, preemptions_total=engine.preemptions_total,
                                      prefix_cached_blocks=load.prefix_cached_blocks,
                                      prefix_evictable_blocks=load.prefix_evictable_blocks,
                                      prefix_evictions_total=blocks.cache.evictions_total if blocks.cache else 0,
                                      prefix_lookup_tokens=engine.accounting.prefix_lookup_tokens,
                                      prefix_hit_tokens=engine.accounting.prefix_hit_tokens,
                                      kv_bytes_received_total=engine.accounting.kv_bytes_received,
                                      kv_bytes_saved_total=engine.accounting.kv_bytes_saved)

    @grpc_edge(new_work=False)
    async def ResetPrefixCache(self, request: decode_pb2.ResetPrefixCacheRequest,
                               context: grpc.aio.ServicerContext) -> decode_pb2.ResetPrefixCacheReply:
        engine, _ = self._state()
        return decode_pb2.ResetPrefixCacheReply(blocks_freed=engine.blocks.flush())


def _consume(future: asyncio.Future[None]) -> None:
    """Retrieve a transfer's verifications' outcome (a revoked lease, most likely) so it is not
    logged as never retrieved; the transfer's own failure has been reported."""
    if not future.cancelled():
        future.exception()


def _as_is(request: bytes) -> bytes:
    return request


def add_to_server(servicer: DecodeServicer, server: grpc.aio.Server) -> None:
    """Registers the servicer as the generated add_DecodeServiceServicer_to_server does, except that
    TransferKv takes its messages unparsed: parse_wire reads a chunk's data without copying it."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=decode_pb2.DecodeRequest.FromString,
            response_serializer=decode_pb2.DecodeEvent.SerializeToString),
        "TransferKv": grpc.stream_unary_rpc_method_handler(
            servicer.TransferKv, request_deserializer=_as_is,
            response_serializer=decode_pb2.TransferKvReply.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=common_pb2.ModelInfoRequest.FromString,
            response_serializer=common_pb2.ModelInfo.SerializeToString),
        "Stats": grpc.unary_unary_rpc_method_handler(
            servicer.Stats, request_deserializer=common_pb2.StatsRequest.FromString,
            response_serializer=decode_pb2.DecodeStats.SerializeToString),
        "ResetPrefixCache": grpc.unary_unary_rpc_method_handler(
            servicer.ResetPrefixCache, request_deserializer=decode_pb2.ResetPrefixCacheRequest.FromString,
            response_serializer=decode_pb2.ResetPrefixCacheReply.SerializeToString),
    }
    name = decode_pb2.DESCRIPTOR.services_by_name["DecodeService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


def _token_pb(event: Token) -> decode_pb2.DecodeToken:
    return decode_pb2.DecodeToken(token_id=event.token_id, index=event.index, ends_output=event.ends_output,
                                  choice=event.choice,
                                  **logprobs.token_fields(event.logprob, event.prompt_logprobs))
