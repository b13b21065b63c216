"""One gRPC channel per peer address, reused across requests and closed on shutdown.

Channels come from a ChannelFactory (plaintext or TLS). When the TLS files change, `get` makes a
new channel with the new material; the old one is retired: closed once its calls finished (at
most `retire_grace_seconds` later), so a rotation never cuts a stream short."""

from __future__ import annotations

import asyncio

import grpc

from services.common.channel_factory import ChannelFactory
from services.common.tls import TlsMaterial


class ChannelPool:
    def __init__(self, factory: ChannelFactory, retire_grace_seconds: float = 600.0) -> None:
        self.factory = factory
        self._grace = retire_grace_seconds
        self._channels: dict[str, tuple[TlsMaterial | None, grpc.aio.Channel]] = {}
        self._retiring: dict[grpc.aio.Channel, asyncio.Task[None]] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        material = self.factory.material()
        entry = self._channels.get(address)
        if entry is None or entry[0] is not material:
            if entry is not None:
                self._retire(entry[1])
            entry = material, self.factory.create(address, material)
            self._channels[address] = entry
        return entry[1]

    def discard(self, address: str) -> None:
        """A peer that left: its channel is closed once the calls on it finished."""
        entry = self._channels.pop(address, None)
        if entry is not None:
            self._retire(entry[1])

    def _retire(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.ensure_future(channel.close(self._grace))
        self._retiring[channel] = task
        task.add_done_callback(lambda _: self._retiring.pop(channel, None))

    async def close(self) -> None:
        channels, self._channels = [channel for _, channel in self._channels.values()], {}
        retiring, self._retiring = self._retiring, {}
        for task in retiring.values():
            task.cancel()
        await asyncio.gather(*retiring.values(), return_exceptions=True)
        for channel in [*channels, *retiring]:
            await channel.close()
