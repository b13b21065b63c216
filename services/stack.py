"""`python -m services.stack` (what `make up` runs): start the four services as local processes,
wait until each is healthy, print the addresses, and stop them all on Ctrl-C or SIGTERM. With
`--tls`, a throwaway CA and a certificate per service (and one for a client) are written to
`--tls-dir` (.tls/) and every service runs with TLS and mutual TLS between the services.

Tests use `Stack` to run the same processes on free ports.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from grpc_health.v1 import health_pb2

from services.common.healthcheck import health_status
from services.common.pki import write_stack_pki
from services.common.placement import check_cpus, check_wait_policy
from services.common.tls import TlsFiles


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One service process: `python -m services.<module> <args>` with extra environment, listening
    on `host`; `launcher` runs it (e.g. `ip netns exec NAME` for another network namespace)."""

    name: str
    module: str
    port: int
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cpus: frozenset[int] | None = None  # pin the process to these cores
    host: str = "127.0.0.1"
    launcher: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class PortAllocator:
    """Free loopback ports, never the same one twice: the kernel may hand a just-released port out
    again, and two services given one port collide."""

    def __init__(self) -> None:
        self._issued: set[int] = set()

    def take(self) -> int:
        while True:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            if port not in self._issued:
                self._issued.add(port)
                return port

    def take_run(self, count: int) -> int:
        """The first of `count` consecutive free ports (a stack's base port: its services listen on
        base, base + 1, ...), all issued: `take` never hands one of them out again."""
        while True:
            first = self.take()
            run = range(first, first + count)
            if run[-1] <= 65535 and all(port == first or (port not in self._issued and _bindable(port))
                                        for port in run):
                self._issued.update(run)
                return first


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_PORTS = PortAllocator()  # one per process, so no two callers get the same port
free_port = _PORTS.take
free_port_run = _PORTS.take_run


class Stack:
    """Processes started together and stopped together."""

    def __init__(self, specs: Sequence[ServiceSpec], log_dir: str | None = None, tls: TlsFiles | None = None) -> None:
        self.specs = list(specs)
        self._log_dir = log_dir
        self.tls = tls  # what health checks present to TLS services
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def log_dir(self) -> str | None:
        """Where each service writes `<name>.log` (None: they inherit this process's output)."""
        return self._log_dir

    def start(self) -> None:
        for spec in self.specs:
            self.start_one(spec)

    def start_one(self, spec: ServiceSpec) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
        output = open(os.path.join(self._log_dir, f"{spec.name}.log"), "ab") if self._log_dir else None
        cpus = spec.cpus
        process = subprocess.Popen([*spec.launcher, sys.executable, "-m", f"services.{spec.module}", *spec.args],
                                   env=env, stdout=output, stderr=subprocess.STDOUT if output else None,
                                   preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        self.processes[spec.name] = process
        return process

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for spec in self.specs:
            while health_status(spec.address, tls=self.tls) != health_pb2.HealthCheckResponse.SERVING:
                process = self.processes[spec.name]
                if process.poll() is not None:
                    raise RuntimeError(f"{spec.name} exited with code {process.returncode} before becoming healthy")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{spec.name} at {spec.address} not healthy after {timeout:.0f}s")
                time.sleep(0.2)

    def stop(self, timeout: float = 15.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass(frozen=True, slots=True)
class WorkerPlacement:
    """Cores and intra-op threads of the two model workers (see services/common/placement.py). The
    default splits the cores this launcher may use: decode the first half (rounded up), prefill the
    rest, one torch thread per core each, OpenMP threads waiting passively."""

    decode_cpus: str = "first-half"
    prefill_cpus: str = "second-half"
    decode_threads: int = 0  # 0: one per core it owns
    prefill_threads: int = 0
    omp_wait_policy: str = "PASSIVE"  # '' leaves OpenMP's default (spin, then sleep)

    def __post_init__(self) -> None:
        for cpus in (self.decode_cpus, self.prefill_cpus):
            check_cpus(cpus)
        if self.decode_threads < 0 or self.prefill_threads < 0:
            raise ValueError("worker thread counts must be >= 0")
        check_wait_policy(self.omp_wait_policy)

    def args(self, role: str) -> tuple[str, ...]:
        cpus, threads = ((self.decode_cpus, self.decode_threads) if role == "decode"
                         else (self.prefill_cpus, self.prefill_threads))
        return ("--cpus", cpus, "--torch-threads", str(threads))

    def env(self) -> dict[str, str]:
        return {"OMP_WAIT_POLICY": self.omp_wait_policy.upper()} if self.omp_wait_policy else {}


UNPLACED = WorkerPlacement("", "", 0, 0, "")  # every worker on every core, torch's and OpenMP's defaults


def local_stack(ports: Mapping[str, int], model: str, kvstore_backend: str = "memory", kv_transfer: str = "direct",
                redis_url: str = "redis://127.0.0.1:6379/0", extra: Mapping[str, Sequence[str]] | None = None,
                log_level: str = "INFO", metrics_ports: Mapping[str, int] | None = None,
                tls: Mapping[str, TlsFiles] | None = None, placement: WorkerPlacement = UNPLACED
                ) -> list[ServiceSpec]:
    """The four services wired to each other on loopback; /metrics off unless `metrics_ports`; each
    service with its TLS files when `tls` names them; the workers placed by `placement`."""
    metrics = metrics_ports or {}
    extra = {name: ("--metrics-port", str(metrics.get(name, 0)), *(extra or {}).get(name, ()))
             for name in ("gateway", "prefill", "decode", "kvstore")}
    extra["gateway"] = ("--http-port", str(ports.get("http", 0)), *extra["gateway"])
    for role in ("prefill", "decode"):
        extra[role] = (*placement.args(role), *extra[role])
    kvstore = f"127.0.0.1:{ports['kvstore']}"
    common = ("--log-level", log_level)
    worker = ("--model", model, "--kvstore-address", kvstore, *common)
    specs = [
        ServiceSpec("kvstore", "kvstore", ports["kvstore"],
                    ("--port", str(ports["kvstore"]), "--backend", kvstore_backend, "--redis-url", redis_url,
                     *common, *extra.get("kvstore", ()))),
        ServiceSpec("prefill", "prefill", ports["prefill"],
                    ("--port", str(ports["prefill"]), *worker, *extra.get("prefill", ()))),
        ServiceSpec("decode", "decode", ports["decode"],
                    ("--port", str(ports["decode"]), *worker, *extra.get("decode", ()))),
        ServiceSpec("gateway", "gateway", ports["gateway"],
                    ("--port", str(ports["gateway"]), "--prefill-addresses", f"127.0.0.1:{ports['prefill']}",
                     "--decode-addresses", f"127.0.0.1:{ports['decode']}", "--kv-transfer", kv_transfer,
                     "--model", model, *common, *extra.get("gateway", ()))),
    ]
    tls = tls or {}
    return [ServiceSpec(s.name, s.module, s.port, s.args,
                        {**(tls[s.name].environment() if s.name in tls else {}),
                         **(placement.env() if s.name in ("prefill", "decode") else {})})
            for s in specs]


def tls_hint(client: TlsFiles) -> str:
    """How to call a stack that `--tls` started."""
    return (f"\nTLS is on: certificates of a throwaway CA ({client.ca}); the internal services require client "
            f"certificates (mutual TLS).\n  The gateway (gRPC and HTTPS) is verified with --tls-ca {client.ca}; "
            f"an internal service also wants a client certificate:\n  grpcurl -cacert {client.ca} -cert {client.cert} "
            f"-key {client.key} 127.0.0.1:PORT list\n")


def worker_placement(args: argparse.Namespace) -> WorkerPlacement:
    """The placement the launcher's flags ask for. Raises ValueError."""
    base = WorkerPlacement() if args.placement == "auto" else UNPLACED
    return WorkerPlacement(base.decode_cpus if args.decode_cpus is None else args.decode_cpus,
                           base.prefill_cpus if args.prefill_cpus is None else args.prefill_cpus,
                           args.decode_threads, args.prefill_threads, base.omp_wait_policy)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.stack", description=__doc__)
    parser.add_argument("--model", default=os.environ.get("MODEL", "default"))
    parser.add_argument("--kvstore-backend", default=os.environ.get("KVSTORE_BACKEND", "memory"),
                        choices=("memory", "redis", "shm"))
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--kv-transfer", default=os.environ.get("KV_TRANSFER", "direct"),
                        choices=("direct", "kvstore"))
    parser.add_argument("--base-port", type=int, default=int(os.environ.get("BASE_PORT", "50051")),
                        help="gateway port; prefill, decode and kvstore take the next three")
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("GATEWAY_HTTP_PORT", "8000")),
                        help="port of the gateway's OpenAI-compatible HTTP API")
    parser.add_argument("--metrics-base-port", type=int, default=int(os.environ.get("METRICS_BASE_PORT", "9100")),
                        help="gateway /metrics port; prefill, decode and kvstore take the next three")
    parser.add_argument("--summary", action="store_true",
                        help="the gateway logs one line per request: TTFT, handoff latency, KV bytes, tokens/s")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    parser.add_argument("--tls", action="store_true", help="TLS everywhere, mutual TLS between the services, with "
                        "a throwaway CA and certificates written to --tls-dir")
    placement = parser.add_argument_group("CPU placement of the workers (see the README's 'CPU placement')")
    placement.add_argument("--placement", choices=("auto", "none"), default=os.environ.get("PLACEMENT", "auto"),
                           help="auto: decode and prefill on disjoint halves of the cores, one thread per core, "
                           "passive OpenMP waits; none: every worker on every core with torch's defaults")
    placement.add_argument("--decode-cpus", default=os.environ.get("DECODE_CPUS"),
                           help="decode cores (first-half, second-half, '' for all, or a list such as 0-3)")
    placement.add_argument("--prefill-cpus", default=os.environ.get("PREFILL_CPUS"), help="prefill cores, likewise")
    placement.add_argument("--decode-threads", type=int, default=int(os.environ.get("DECODE_THREADS", "0")),
                           help="decode torch threads (0: one per core it owns)")
    placement.add_argument("--prefill-threads", type=int, default=int(os.environ.get("PREFILL_THREADS", "0")),
                           help="prefill torch threads (0: one per core it owns)")
    parser.add_argument("--tls-dir", type=Path, default=Path(".tls"), help="where --tls writes them (default .tls)")
    args = parser.parse_args()
    try:
        placed = worker_placement(args)
    except ValueError as error:
        parser.error(str(error))
    names = ("gateway", "prefill", "decode", "kvstore")
    ports = {name: args.base_port + offset for offset, name in enumerate(names)} | {"http": args.http_port}
    metrics_ports = {name: args.metrics_base_port + offset for offset, name in enumerate(names)}
    extra = {"gateway": ("--request-summary",) if args.summary else ()}
    tls = write_stack_pki(args.tls_dir, (*names, "client")) if args.tls else None
    stack = Stack(local_stack(ports, args.model, args.kvstore_backend, args.kv_transfer, args.redis_url, extra,
                              args.log_level, metrics_ports, tls, placed), tls=tls["client"] if tls else None)
    def request_stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, request_stop)
    exit_code = 0
    try:
        stack.start()
        stack.wait_healthy(timeout=600)
        print("\nAll four services are healthy:", flush=True)
        for spec in stack.specs:
            print(f"  {spec.name:8s} grpc://{spec.address}   metrics http://127.0.0.1:{metrics_ports[spec.name]}/metrics",
                  flush=True)
        gateway, scheme = f"127.0.0.1:{ports['gateway']}", "https" if tls else "http"
        print(f"  {'http':8s} {scheme}://127.0.0.1:{args.http_port}/v1   (OpenAI-compatible API)", flush=True)
        print(tls_hint(tls["client"]) if tls else "", end="", flush=True)
        ca = f" --tls-ca {tls['client'].ca}" if tls else ""
        print(f'\nTry: .venv/bin/python -m services.client --address {gateway}{ca} "The capital of France is"'
              f"\n     curl{ca.replace('--tls-ca', '--cacert')} {scheme}://127.0.0.1:{args.http_port}/v1/models"
              "\nCtrl-C stops everything.", flush=True)
        while all(p.poll() is None for p in stack.processes.values()):
            time.sleep(0.5)
        print("a service exited; stopping the stack", file=sys.stderr)
        exit_code = 1
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean stop short
            signal.signal(sig, signal.SIG_IGN)
        stack.stop()
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
