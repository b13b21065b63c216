"""How a service dials the other services of this system: one place that knows the message
limits, the trace propagation and the TLS material (plaintext when there is none)."""

from __future__ import annotations

import grpc

from services.common.server import GRPC_OPTIONS
from services.common.targets import channel_target
from services.common.telemetry import client_interceptors
from services.common.tls import TlsMaterial, TlsSource, channel_credentials

RELOAD_CHECK_SECONDS = 1.0  # how often clients look at the TLS files for a rotation


class ChannelFactory:
    """Makes channels: TLS with the CA as trust root and our certificate as client certificate
    when `tls` is given, plaintext otherwise. `material()` tells when the files changed, so that
    owners of long-lived channels (ChannelPool) make new ones."""

    def __init__(self, tls: TlsSource | None = None, check_interval_seconds: float = RELOAD_CHECK_SECONDS) -> None:
        self._tls = tls
        self._interval = check_interval_seconds

    @property
    def secure(self) -> bool:
        return self._tls is not None

    def material(self) -> TlsMaterial | None:
        """The current TLS material (None in plaintext), a new object after a rotation."""
        return None if self._tls is None else self._tls.refresh(self._interval)

    def create(self, address: str, material: TlsMaterial | None = None) -> grpc.aio.Channel:
        """A channel to `address` (several, comma separated: one round-robin channel over those
        serving, services/common/targets.py), with `material` (default: the current one) when TLS
        is on."""
        interceptors = client_interceptors()
        target = channel_target(address)
        options = [*GRPC_OPTIONS, *target.options]
        if self._tls is None:
            return grpc.aio.insecure_channel(target.target, options=options, interceptors=interceptors)
        options += self._tls.files.channel_options()
        return grpc.aio.secure_channel(target.target, channel_credentials(material or self._tls.current),
                                       options=options, interceptors=interceptors)
