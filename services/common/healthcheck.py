"""`python -m services.common.healthcheck HOST:PORT`: exit 0 if the gRPC server there is SERVING.

Used as the container health check (docker-compose, Kubernetes exec probes). Against a TLS server
it reads TLS_CA, TLS_CERT, TLS_KEY and TLS_SERVER_NAME from the environment (the service's own,
in its container) or the same flags, and presents the certificate to servers that require one."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.tls import TlsFiles, client_channel
from services.common.tls_settings import add_tls_arguments, client_tls


def health_status(address: str, timeout: float = 1.0, tls: TlsFiles | None = None, service: str = "") -> int:
    """The server's health status (overall, or of `service`), or -1 if it does not answer (TLS
    with `tls`)."""
    with client_channel(grpc, address, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError:
            return -1
    return reply.status


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.common.healthcheck", description=__doc__)
    parser.add_argument("address", metavar="HOST:PORT")
    parser.add_argument("--service", default="", help="health service name: '' (ready to serve, the default) or "
                        "'liveness' (the process works, even while not ready)")
    add_tls_arguments(parser)
    args = parser.parse_args(argv)
    status = health_status(args.address, timeout=3.0, tls=client_tls(args), service=args.service)
    sys.exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)


if __name__ == "__main__":
    main()
