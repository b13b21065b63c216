"""Benchmarks: `python -m services.bench.transfer` (KV handoff throughput)."""
