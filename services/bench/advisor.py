"""The ratio advisor: from measured prefill and decode speeds of the served model on this hardware,
how many prefill and decode workers a workload needs, and whether disaggregation pays off at all.

The model (deliberately simple, documented in the README):
- A prefill worker serves prompts of P tokens at `prefill_tps(P)` tokens/s: it takes
  P / prefill_tps(P) seconds per prompt, so it can take rate_per_worker = prefill_tps(P) / P
  prompts/s. Prefill workers = ceil(rate / (rate_per_worker * utilization)).
- A decode worker at batch size B takes step(B) seconds per step and produces B tokens per step.
  The largest B whose step time meets the TPOT SLO gives tokens/s = B / step(B). Decode workers =
  ceil(rate * O / (that tokens/s * utilization)).
- Unified workers (no disaggregation) also spend rate * P / prefill_tps(P) of their time on prefill.
- Disaggregation pays off when a prefill would stall decoding longer than the TPOT SLO allows
  (P / prefill_tps(P) > TPOT SLO) and the KV handoff is cheap next to the prefill. Otherwise a
  unified worker (prefill and decode on the same worker) is simpler and avoids moving KV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Profile:
    """Measured speeds: prompt length -> prefill tokens/s; batch size -> decode step seconds."""

    prefill_tokens_per_s: dict[int, float]
    decode_step_seconds: dict[int, float]
    kv_bytes_per_token: int
    transfer_bytes_per_s: float

    def prefill_tps(self, prompt_tokens: float) -> float:
        return _interpolate(self.prefill_tokens_per_s, prompt_tokens)

    def step_seconds(self, batch: float) -> float:
        return _interpolate(self.decode_step_seconds, batch)


@dataclass(frozen=True, slots=True)
class Workload:
    rate: float  # requests/s
    prompt_tokens: float  # mean
    output_tokens: float  # mean
    ttft_slo_s: float
    tpot_slo_s: float
    utilization: float = 0.8  # plan workers to run at most this busy


@dataclass(frozen=True, slots=True)
class Advice:
    prefill_workers: int
    decode_workers: int
    decode_batch: int
    disaggregate: bool
    prefill_seconds: float
    handoff_seconds: float
    reasons: tuple[str, ...]


def _interpolate(points: dict[int, float], x: float) -> float:
    keys = sorted(points)
    if x <= keys[0]:
        return points[keys[0]]
    for low, high in zip(keys, keys[1:]):
        if x <= high:
            share = (x - low) / (high - low)
            return points[low] + share * (points[high] - points[low])
    return points[keys[-1]]


def advise(profile: Profile, workload: Workload) -> Advice:
    reasons = []
    prefill_seconds = workload.prompt_tokens / profile.prefill_tps(workload.prompt_tokens)
    handoff_seconds = workload.prompt_tokens * profile.kv_bytes_per_token / profile.transfer_bytes_per_s
    per_prefill_worker = 1.0 / prefill_seconds
    prefill_workers = max(1, math.ceil(workload.rate / (per_prefill_worker * workload.utilization)))
    batches = [b for b in sorted(profile.decode_step_seconds) if profile.step_seconds(b) <= workload.tpot_slo_s]
    batch = batches[-1] if batches else min(profile.decode_step_seconds)
    if not batches:
        reasons.append(f"no batch size meets the TPOT SLO of {workload.tpot_slo_s * 1e3:.0f} ms on this hardware")
    decode_tps = batch / profile.step_seconds(batch)
    decode_workers = max(1, math.ceil(workload.rate * workload.output_tokens / (decode_tps * workload.utilization)))
    if prefill_seconds > workload.ttft_slo_s:
        reasons.append(f"one prefill takes {prefill_seconds * 1e3:.0f} ms, over the TTFT SLO")
    stalls = prefill_seconds > workload.tpot_slo_s
    cheap_handoff = handoff_seconds < prefill_seconds
    disaggregate = stalls and cheap_handoff
    reasons.append(
        f"a prefill stalls decoding for {prefill_seconds * 1e3:.0f} ms against a TPOT SLO of "
        f"{workload.tpot_slo_s * 1e3:.0f} ms; moving its KV costs ~{handoff_seconds * 1e3:.0f} ms: "
        + ("disaggregate" if disaggregate else "a unified worker is enough (short prompts: disaggregation does "
                                               "not pay off)"))
    if not disaggregate:  # unified workers also spend their time prefilling
        busy = workload.rate * workload.output_tokens / decode_tps + workload.rate * prefill_seconds
        decode_workers = max(1, math.ceil(busy / workload.utilization))
    return Advice(prefill_workers if disaggregate else 0, decode_workers, batch, disaggregate, prefill_seconds,
                  handoff_seconds, tuple(reasons))
