"""Conversion between the KV codec's domain objects and their protobuf messages, and the keys
under which a transfer is stored in the kvstore: `kv/<request id>/t<attempt>/` for a prefill's
transfer, `kv/<request id>/s<n>/` for a swapped-out sequence; request ids are the gateway's
internal ids, so no client can name another request's keys."""

from __future__ import annotations

import dataclasses
from typing import cast

import grpc
from google.protobuf.message import DecodeError

from services.common.errors import KvProtocolError
from services.common.kv_codec import CRC32, CRC32C, ChunkSpan, KvChunk, KvEnd, KvLayout, ShmSlice
from services.common.pb import decode_pb2, kv_pb2

_DTYPE_TO_PB = {"float32": kv_pb2.KV_DTYPE_FLOAT32, "bfloat16": kv_pb2.KV_DTYPE_BFLOAT16,
                "float16": kv_pb2.KV_DTYPE_FLOAT16}
_DTYPE_FROM_PB: dict[int, str] = {value: key for key, value in _DTYPE_TO_PB.items()}
_ENCODING_TO_PB = {"raw": kv_pb2.KV_ENCODING_RAW, "fp8": kv_pb2.KV_ENCODING_FP8_E4M3}
_ENCODING_FROM_PB: dict[int, str] = {value: key for key, value in _ENCODING_TO_PB.items()}
_CHECKSUM_TO_PB = {CRC32: kv_pb2.KV_CHECKSUM_CRC32, CRC32C: kv_pb2.KV_CHECKSUM_CRC32C}
# UNSPECIFIED: a sender that predates KvLayout.checksum, which sent CRC-32
_CHECKSUM_FROM_PB: dict[int, str] = {kv_pb2.KV_CHECKSUM_UNSPECIFIED: CRC32, kv_pb2.KV_CHECKSUM_CRC32: CRC32,
                     kv_pb2.KV_CHECKSUM_CRC32C: CRC32C}

KvMessage = KvLayout | KvChunk | KvEnd


def _dtype(value: int) -> str:
    if value not in _DTYPE_FROM_PB:
        raise KvProtocolError(f"unknown KV dtype {value}")
    return _DTYPE_FROM_PB[value]


def _encoding(value: int) -> str:
    if value not in _ENCODING_FROM_PB:
        raise KvProtocolError(f"unknown KV encoding {value}")
    return _ENCODING_FROM_PB[value]


def _checksum(value: int) -> str:
    if value not in _CHECKSUM_FROM_PB:
        raise KvProtocolError(f"unknown KV checksum {value}")
    return _CHECKSUM_FROM_PB[value]


def _shm_to_pb(where: ShmSlice | None) -> kv_pb2.KvShmSlice | None:
    return None if where is None else kv_pb2.KvShmSlice(segment=where.segment, offset=where.offset,
                                                         length=where.length)


def _shm_from_pb(chunk: kv_pb2.KvChunk) -> ShmSlice | None:
    return ShmSlice(chunk.shm.segment, chunk.shm.offset, chunk.shm.length) if chunk.HasField("shm") else None


def to_pb(message: KvMessage) -> kv_pb2.KvTransferMessage:
    if isinstance(message, KvLayout):
        return kv_pb2.KvTransferMessage(layout=kv_pb2.KvLayout(
            request_id=message.request_id, model_fingerprint=message.model_fingerprint,
            num_layers=message.num_layers, num_kv_heads=message.num_kv_heads, head_dim=message.head_dim,
            num_tokens=message.num_tokens, chunk_tokens=message.chunk_tokens, chunk_layers=message.chunk_layers,
            dtype=_DTYPE_TO_PB[message.dtype], encoding=_ENCODING_TO_PB[message.encoding],
            transfer_attempt=message.transfer_attempt, chunks_in_kvstore=message.chunks_in_kvstore,
            checksum=_CHECKSUM_TO_PB[message.checksum], shm_segment=message.shm_segment,
            token_start=message.token_start))
    if isinstance(message, KvChunk):  # data as bytes: protobuf itself refuses a memoryview (TypeError)
        span = message.span
        return kv_pb2.KvTransferMessage(chunk=kv_pb2.KvChunk(
            request_id=message.request_id, model_fingerprint=message.model_fingerprint, index=message.index,
            layer_start=span.layer_start, layer_end=span.layer_end, token_start=span.token_start,
            token_end=span.token_end, dtype=_DTYPE_TO_PB[message.dtype],
            encoding=_ENCODING_TO_PB[message.encoding], shape=message.shape,
            byte_length=message.byte_length, crc32=message.crc32, data=cast(bytes, message.data), crc32c=message.crc32c,
            shm=_shm_to_pb(message.shm), scales=message.scales))
    return kv_pb2.KvTransferMessage(end=kv_pb2.KvTransferEnd(
        request_id=message.request_id, chunk_count=message.chunk_count, first_token=message.first_token,
        forward_end_unix_nanos=message.forward_end_unix_nanos, choice_first_tokens=message.choice_first_tokens))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_CHUNK_TAG = b"\x12"  # KvTransferMessage.chunk: field 2, length-delimited
_DATA_TAG = b"\x6a"  # KvChunk.data: field 13, length-delimited


def wire_bytes(message: KvMessage) -> bytes:
    """The message serialized as a KvTransferMessage, copying a chunk's data once: protobuf would copy
    it into the message and again into the serialization (~3 MB per chunk). A chunk is its other
    fields serialized by protobuf, then `data` framed by hand; fields may come in any order on the
    wire, so any protobuf parser reads it as the message `to_pb` makes."""
    if not isinstance(message, KvChunk):
        return to_pb(message).SerializeToString()
    header = to_pb(dataclasses.replace(message, data=b"")).chunk.SerializeToString()
    data_length = _varint(len(message.data))
    chunk_length = len(header) + len(_DATA_TAG) + len(data_length) + len(message.data)
    return b"".join((_CHUNK_TAG, _varint(chunk_length), header, _DATA_TAG, data_length, message.data))


_TRANSFER_KV = decode_pb2.DESCRIPTOR.services_by_name["DecodeService"].methods_by_name["TransferKv"]
TRANSFER_KV_PATH = f"/{_TRANSFER_KV.containing_service.full_name}/{_TRANSFER_KV.name}"


def _as_is(message: bytes) -> bytes:
    return message


def transfer_kv_bytes(channel: grpc.aio.Channel) -> grpc.aio.StreamUnaryMultiCallable:
    """DecodeService.TransferKv taking messages already serialized by `wire_bytes`."""
    return channel.stream_unary(TRANSFER_KV_PATH, request_serializer=_as_is,
                                response_deserializer=decode_pb2.TransferKvReply.FromString)


def _chunk(c: kv_pb2.KvChunk, data: bytes | memoryview) -> KvChunk:
    """The domain chunk of a protobuf chunk, with `data` (protobuf's copy, or a view: parse_wire)."""
    span = ChunkSpan(c.layer_start, c.layer_end, c.token_start, c.token_end)
    return KvChunk(c.request_id, c.model_fingerprint, c.index, span, _dtype(c.dtype), _encoding(c.encoding),
                   tuple(c.shape), c.byte_length, c.crc32, data, c.crc32c, shm=_shm_from_pb(c), scales=c.scales)


def from_pb(message: kv_pb2.KvTransferMessage) -> KvMessage:
    kind = message.WhichOneof("kind")
    if kind == "layout":
        m = message.layout
        return KvLayout(m.request_id, m.model_fingerprint, m.num_layers, m.num_kv_heads, m.head_dim,
                        m.num_tokens, m.chunk_tokens, m.chunk_layers, _dtype(m.dtype), _encoding(m.encoding),
                        m.transfer_attempt, m.chunks_in_kvstore, _checksum(m.checksum), shm_segment=m.shm_segment,
                        token_start=m.token_start)
    if kind == "chunk":
        return _chunk(message.chunk, message.chunk.data)
    if kind == "end":
        e = message.end
        return KvEnd(e.request_id, e.chunk_count, e.first_token, e.forward_end_unix_nanos, tuple(e.choice_first_tokens))
    raise KvProtocolError("empty KV transfer message")


class _NotOneChunk(Exception):
    """The bytes are not one KvTransferMessage.chunk with one data field: protobuf parses them."""


def _read_varint(raw: bytes, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while position < end and shift < 64:
        byte = raw[position]
        value, position, shift = value | (byte & 0x7F) << shift, position + 1, shift + 7
        if byte < 0x80:
            return value, position
    raise _NotOneChunk


def _skip_field(raw: bytes, key: int, position: int, end: int) -> int:
    """Where the field whose key ended at `position` ends."""
    wire_type = key & 7
    if wire_type == 0:
        return _read_varint(raw, position, end)[1]
    if wire_type == 2:
        length, position = _read_varint(raw, position, end)
        return position + length
    if wire_type in (1, 5):
        return position + (8 if wire_type == 1 else 4)
    raise _NotOneChunk


def _split_chunk(raw: bytes) -> tuple[bytes, int, int]:
    """A serialized KvTransferMessage holding one chunk: the chunk's fields without `data`, and
    where data lies in `raw`. Anything else (another kind, a field repeated, garbage) raises."""
    end = len(raw)
    if end < 2 or raw[0] != _CHUNK_TAG[0]:
        raise _NotOneChunk
    length, start = _read_varint(raw, 1, end)
    if start + length != end:
        raise _NotOneChunk
    data: tuple[int, int, int] | None = None
    position = start
    while position < end:
        key, after_key = _read_varint(raw, position, end)
        field_end = _skip_field(raw, key, after_key, end)
        if field_end > end:
            raise _NotOneChunk
        if key == _DATA_TAG[0]:
            if data is not None:
                raise _NotOneChunk
            data = (position, _read_varint(raw, after_key, end)[1], field_end)
        position = field_end
    if data is None:
        raise _NotOneChunk
    tag_at, data_start, data_end = data
    return raw[start:tag_at] + raw[data_end:end], data_start, data_end


def parse_wire(raw: bytes) -> KvMessage:
    """A KvTransferMessage as received (TransferKv's raw request bytes, a kvstore value). A chunk's
    data is a read-only view into `raw`, not a copy: protobuf would copy it on parsing and again
    on reading the field (two of the receiver's copies of every byte). Protobuf still parses
    everything else, and all of a message that is not one plain chunk."""
    try:
        header, data_start, data_end = _split_chunk(raw)
    except _NotOneChunk:
        return from_pb(_parse(raw))
    try:
        chunk = kv_pb2.KvChunk.FromString(header)
    except DecodeError:  # the full parse names the fault
        return from_pb(_parse(raw))
    return _chunk(chunk, memoryview(raw)[data_start:data_end])


def _parse(raw: bytes) -> kv_pb2.KvTransferMessage:
    message = kv_pb2.KvTransferMessage()
    try:
        message.ParseFromString(raw)
    except Exception as exc:  # protobuf raises DecodeError subclasses
        raise KvProtocolError(f"KV message does not parse: {exc}") from exc
    return message


def parse_stored(value: bytes) -> KvMessage:
    """A transfer message read back from the kvstore (protobuf parsing only, never unpickling)."""
    message = kv_pb2.KvTransferMessage()
    try:
        message.ParseFromString(value)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError subclasses
        raise KvProtocolError(f"stored KV message does not parse: {exc}") from exc
    return from_pb(message)


def request_prefix(request_id: str) -> str:
    """Every key a request's KV is stored under starts with this (one delete clears them all)."""
    return f"kv/{request_id}/"


def transfer_prefix(request_id: str, attempt: int) -> str:
    """Keys of one transfer attempt from a prefill worker (retries never share keys)."""
    return f"{request_prefix(request_id)}t{attempt}/"


def swap_prefix(request_id: str, swap: int) -> str:
    """Keys of a preempted sequence's KV, swap number `swap` of that request."""
    return f"{request_prefix(request_id)}s{swap}/"


def layout_key(prefix: str) -> str:
    return f"{prefix}layout"


def chunk_key(prefix: str, index: int) -> str:
    return f"{prefix}chunk/{index}"


def end_key(prefix: str) -> str:
    return f"{prefix}end"


def key_of(prefix: str, message: KvMessage) -> str:
    """The key a message of the transfer stored under `prefix` goes to."""
    if isinstance(message, KvLayout):
        return layout_key(prefix)
    if isinstance(message, KvChunk):
        return chunk_key(prefix, message.index)
    return end_key(prefix)
