"""What the workers' prefix caches did during one benchmark run: prefill tokens looked up and found
(not computed again), decode tokens looked up and found, and KV bytes the transfers carried and did
not need to carry (read from the workers' Stats before and after the run)."""

from __future__ import annotations

import grpc

from services.common.pb import common_pb2, decode_pb2_grpc, prefill_pb2_grpc

PREFILL_FIELDS = ("prefix_lookup_tokens_total", "prefix_hit_tokens_total")
DECODE_FIELDS = ("prefix_lookup_tokens", "prefix_hit_tokens", "kv_bytes_received_total", "kv_bytes_saved_total")


async def cache_counts(prefills: list[str], decodes: list[str]) -> dict[str, int]:
    """The workers' counters, summed per role ('prefill.<field>', 'decode.<field>')."""
    counts: dict[str, int] = {}
    for role, addresses, fields in (("prefill", prefills, PREFILL_FIELDS), ("decode", decodes, DECODE_FIELDS)):
        for address in addresses:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = (prefill_pb2_grpc.PrefillServiceStub if role == "prefill"
                        else decode_pb2_grpc.DecodeServiceStub)(channel)
                stats = await stub.Stats(common_pb2.StatsRequest(), timeout=10)
            for field in fields:
                counts[f"{role}.{field}"] = counts.get(f"{role}.{field}", 0) + getattr(stats, field)
    return counts


def cache_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """A run's figures: per role, tokens looked up, found and the hit rate; the decode's KV bytes."""
    delta = {key: after[key] - before.get(key, 0) for key in after}
    figures: dict[str, float] = {}
    for role, (looked, found) in (("prefill", PREFILL_FIELDS), ("decode", DECODE_FIELDS[:2])):
        if f"{role}.{looked}" in delta:
            looked_up, hit = delta[f"{role}.{looked}"], delta[f"{role}.{found}"]
            figures |= {f"{role}_lookup_tokens": looked_up, f"{role}_hit_tokens": hit,
                        f"{role}_hit_rate": hit / max(looked_up, 1)}
    if "decode.kv_bytes_received_total" in delta:
        figures |= {"kv_bytes_moved": delta["decode.kv_bytes_received_total"],
                    "kv_bytes_saved": delta["decode.kv_bytes_saved_total"]}
    return figures


def cache_table(runs: list[dict[str, object]]) -> str:
    rows = [(str(run["label"]), run["prefix_cache"]) for run in runs if run.get("prefix_cache")]
    lines = []
    for label, figures in rows:
        assert isinstance(figures, dict)  # noqa: S101 - set by bench() only
        parts = [f"{role} looked up {figures[f'{role}_lookup_tokens']:>8,.0f} found "
                 f"{figures[f'{role}_hit_tokens']:>8,.0f} ({100 * figures[f'{role}_hit_rate']:5.1f}%)"
                 for role in ("prefill", "decode") if f"{role}_lookup_tokens" in figures]
        if "kv_bytes_moved" in figures:
            parts.append(f"KV moved {figures['kv_bytes_moved'] / 1e6:8.1f} MB, not moved "
                         f"{figures['kv_bytes_saved'] / 1e6:8.1f} MB")
        lines.append(f"{label:>14}  " + " | ".join(parts))
    return "\nprefix caches (tokens in full blocks):\n" + "\n".join(lines) if lines else ""
