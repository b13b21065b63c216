"""`python -m services.bench.kvstore_get`: time a kvstore Get of one value (1 MB by default) read as
bytes over gRPC against read from its shared-memory segment (the shm backend's descriptor path), in
one run on kvstores started here on loopback: a memory-backend kvstore (bytes, the path before shm)
and an shm-backend kvstore (bytes, and by descriptor). Each figure is the median of `--gets` calls
of the worker's kvstore client, value checked."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from services.common.channel_factory import ChannelFactory
from services.common.kvstore_client import KvStoreClient
from services.stack import ServiceSpec, Stack, free_port

NAMESPACE = "bench"


@dataclass(frozen=True, slots=True)
class GetFigure:
    path: str
    median_ms: float
    gb_per_s: float


async def time_gets(address: str, value_bytes: int, gets: int, shared_memory_reads: bool) -> float:
    """Median seconds of one Get of a `value_bytes` value through the kvstore client at `address`."""
    value = os.urandom(value_bytes)
    client = KvStoreClient(address, NAMESPACE, 30.0, ChannelFactory(), shared_memory_reads)
    try:
        await client.put("value", value)
        if await client.get("value") != value:  # warm-up, and the bytes are checked once
            raise RuntimeError("the kvstore returned other bytes")
        samples = []
        for _ in range(gets):
            began = time.perf_counter()
            await client.get("value")
            samples.append(time.perf_counter() - began)
        await client.delete_prefix("value")
        return statistics.median(samples)
    finally:
        await client.close()


async def measure(addresses: dict[str, str], value_bytes: int, gets: int) -> list[GetFigure]:
    runs = [("memory backend, gRPC bytes", addresses["memory"], False),
            ("shm backend, gRPC bytes", addresses["shm"], False),
            ("shm backend, descriptor", addresses["shm"], True)]
    figures = []
    for label, address, shared in runs:
        seconds = await time_gets(address, value_bytes, gets, shared)
        figures.append(GetFigure(label, seconds * 1e3, value_bytes / seconds / 1e9))
    return figures


def table(figures: list[GetFigure], value_bytes: int) -> str:
    base = figures[0].median_ms
    lines = [f"kvstore Get of a {value_bytes / 1e6:.2f} MB value (median per call)",
             f"{'path':<28} {'ms':>8} {'GB/s':>7} {'vs memory bytes':>16}"]
    lines += [f"{f.path:<28} {f.median_ms:8.3f} {f.gb_per_s:7.2f} {base / f.median_ms:15.2f}x" for f in figures]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.bench.kvstore_get", description=__doc__)
    parser.add_argument("--mb", type=float, default=1.0, help="value size in MB (10^6 bytes)")
    parser.add_argument("--gets", type=int, default=200, help="timed Gets per path")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    value_bytes = int(args.mb * 1e6)
    specs = []
    for backend in ("memory", "shm"):
        port = free_port()
        specs.append(ServiceSpec(backend, "kvstore", port, ("--port", str(port), "--metrics-port", "0", "--backend",
                                                            backend, "--log-level", "WARNING")))
    with tempfile.TemporaryDirectory() as log_dir:
        stack = Stack(specs, log_dir=log_dir)
        stack.start()
        try:
            stack.wait_healthy(timeout=120)
            figures = asyncio.run(measure({s.name: s.address for s in specs}, value_bytes, args.gets))
        finally:
            stack.stop()
    if args.json:
        json.dump({"value_bytes": value_bytes, "figures": [asdict(f) for f in figures]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(table(figures, value_bytes) + "\n")


if __name__ == "__main__":
    main()
