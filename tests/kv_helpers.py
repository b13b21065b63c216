"""Crafting KV transfers by hand, to send straight to a decode worker."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import grpc
import torch

from services.common.client_stream import ServerStatus
from services.common.kv_codec import CRC32C, KvChunk, KvEnd, KvLayout, encode_chunk
from services.common.kv_wire import to_pb
from services.common.pb import common_pb2, decode_pb2, decode_pb2_grpc, kv_pb2

Message = KvLayout | KvChunk | KvEnd


def real_transfer(model: common_pb2.ModelInfo, request_id: str, num_tokens: int, chunk_tokens: int,
                  chunk_layers: int, first_token: int = 42, seed: int = 0, checksum: str = CRC32C,
                  encoding: str = "raw") -> list[Message]:
    """A well-formed transfer of random KV (drawn from `seed`) with the model's geometry."""
    layout = KvLayout(request_id, model.fingerprint, model.num_layers, model.num_kv_heads, model.head_dim,
                      num_tokens, chunk_tokens, chunk_layers, model.dtype, encoding, checksum=checksum)
    generator = torch.Generator().manual_seed(seed)
    size = (model.num_layers, model.num_kv_heads, num_tokens, model.head_dim)
    keys, values = torch.randn(size, generator=generator), torch.randn(size, generator=generator)
    messages: list[Message] = [layout]
    for group in range(layout.layer_groups):
        layers = slice(group * chunk_layers, (group + 1) * chunk_layers)
        messages += [encode_chunk(layout, i, keys[layers], values[layers]) for i in layout.group_chunks(group)]
    return [*messages, KvEnd(request_id, layout.chunk_count, first_token)]


def replace(message: Message, **changes: object) -> Message:
    return dataclasses.replace(message, **changes)


async def admit(stub: decode_pb2_grpc.DecodeServiceStub, request_id: str, num_tokens: int,
                max_tokens: int = 4, ignore_eos: bool = False) -> grpc.aio.UnaryStreamCall:
    call = stub.Generate(decode_pb2.DecodeRequest(
        request_id=request_id, prompt_token_ids=list(range(1, num_tokens + 1)),
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos),
        kv_source=decode_pb2.KV_SOURCE_DIRECT), timeout=60)
    first = await call.read()
    assert first.HasField("accepted")
    return call


async def send(stub: decode_pb2_grpc.DecodeServiceStub, messages: Sequence[Message | kv_pb2.KvTransferMessage]
               ) -> decode_pb2.TransferKvReply:
    """Write the messages one by one; if the decode ends the call early, its status is what counts
    (a write into a finished call fails on the client side with a generic error)."""
    call = stub.TransferKv(timeout=60)
    status = ServerStatus(call)  # grpc.aio may report its own INTERNAL instead (client_stream)
    try:
        for message in messages:
            await call.write(message if isinstance(message, kv_pb2.KvTransferMessage) else to_pb(message))
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        raise status.error(error) from None


async def read_tokens(call: grpc.aio.UnaryStreamCall) -> list[int]:
    """The token ids of an admitted decode Generate call, until its finish event."""
    tokens = []
    while (event := await call.read()) is not grpc.aio.EOF:
        if event.HasField("token"):
            tokens.append(event.token.token_id)
    return tokens
