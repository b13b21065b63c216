"""`python -m services.common.healthcheck HOST:PORT`: exit 0 if the gRPC server there is SERVING.

Used as the container health check (docker-compose, Kubernetes exec probes)."""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def health_status(address: str, timeout: float = 1.0) -> int:
    """The server's overall health status, or -1 if it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return -1
    return reply.status


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m services.common.healthcheck HOST:PORT")
    status = health_status(sys.argv[1], timeout=3.0)
    sys.exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)


if __name__ == "__main__":
    main()
