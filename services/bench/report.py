"""Figures of a benchmark run: TTFT, time per output token, inter-token latency and end-to-end
latency at p50/p90/p99, request and token throughput, and goodput (requests per second that met
both the TTFT and the TPOT SLO)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.bench.targets import RequestRecord


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_seconds: float
    tpot_seconds: float


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _spread(values: list[float]) -> dict[str, float]:
    return {f"p{int(q * 100)}": percentile(values, q) for q in (0.5, 0.9, 0.99)} | \
        {"mean": sum(values) / len(values) if values else 0.0}


def summarize(records: list[RequestRecord], wall_seconds: float, slo: Slo, label: str) -> dict[str, object]:
    done = [r for r in records if not r.error and r.token_times]
    met = [r for r in done if r.ttft <= slo.ttft_seconds and r.tpot <= slo.tpot_seconds]
    tokens = sum(r.completion_tokens for r in done)
    wall = max(wall_seconds, 1e-9)
    return {
        "label": label, "requests": len(records), "completed": len(done), "failed": len(records) - len(done),
        "duration_s": wall_seconds, "request_throughput": len(done) / wall, "output_token_throughput": tokens / wall,
        "goodput": len(met) / wall, "slo": {"ttft_s": slo.ttft_seconds, "tpot_s": slo.tpot_seconds},
        "ttft_s": _spread([r.ttft for r in done]), "tpot_s": _spread([r.tpot for r in done]),
        "itl_s": _spread([itl for r in done for itl in r.itls]), "e2e_s": _spread([r.e2e for r in done]),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


def table(runs: list[dict[str, Any]]) -> str:
    lines = [f"{'run':>14} {'done':>5} {'req/s':>7} {'tok/s':>8} {'goodput':>8} | "
             f"{'TTFT p50/p90/p99 ms':>22} | {'TPOT p50/p90/p99 ms':>22} | {'ITL p50/p99 ms':>15} | "
             f"{'e2e p50/p99 s':>14}"]
    for run in runs:
        t, p, i, e = run["ttft_s"], run["tpot_s"], run["itl_s"], run["e2e_s"]
        ms = lambda d, keys: "/".join(f"{d[k] * 1e3:.0f}" for k in keys)  # noqa: E731
        lines.append(f"{run['label']:>14} {run['completed']:>5} {run['request_throughput']:7.2f} "
                     f"{run['output_token_throughput']:8.1f} {run['goodput']:8.2f} | "
                     f"{ms(t, ('p50', 'p90', 'p99')):>22} | {ms(p, ('p50', 'p90', 'p99')):>22} | "
                     f"{ms(i, ('p50', 'p99')):>15} | {e['p50']:6.2f}/{e['p99']:.2f}")
    return "\n".join(lines)
