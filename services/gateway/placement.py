"""Where a prompt is prefilled (`--prefill-mode`): on a prefill worker, which hands its KV over, or on
the decode worker that admitted the request, which computes it into its own blocks.

  disaggregated  a prefill worker, always
  unified        the decode worker, always (no prefill worker is used)
  conditional    the decode worker when the prompt is shorter than --conditional-threshold tokens
  adaptive       (the default) a prompt shorter than --conditional-threshold goes to the shorter
                 queue: prompts waiting for their first token on the prefill workers, per serving
                 prefill worker, or on the decode workers' own prefills, per serving decode worker,
                 both as this gateway placed them. Ties, longer prompts and a quiet system go to a
                 prefill worker; with no prefill worker serving, a short prompt goes to the decode
                 worker rather than fail.

Adaptive is conditional disaggregation driven by load (as NVIDIA Dynamo's router does it): when a
burst of short prompts would queue on the prefill workers while the decode workers' cores wait for
them, both sides prefill at once. A local prefill stalls its decode worker's running streams for its
forward pass, which is why only short prompts may take that way. A prompt counts from the moment it
is placed (no await between the choice and the count, so that a burst's requests see each other)
until its first token comes back or its try ends. Each gateway of several balances what it sends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import Counter

from services.gateway.routing import WorkerPool
from services.gateway.settings import PREFILL_MODES

WHERE = {True: "decode_worker", False: "prefill_worker"}  # the counter's label, by `local`


@dataclass(slots=True)
class PlacedPrefill:
    """One prompt's place, counted in its queue until `prefilled` (idempotent) or the try's end."""

    local: bool
    _queues: dict[bool, int]
    _waiting: bool = True

    def prefilled(self) -> None:
        """Its first token came: the queue it waited in is one shorter."""
        if self._waiting:
            self._waiting = False
            self._queues[self.local] -= 1


class PrefillPlacement:
    def __init__(self, mode: str, threshold: int, prefill: WorkerPool, decode: WorkerPool,
                 prefills: Counter | None = None) -> None:
        if mode not in PREFILL_MODES:
            raise ValueError(f"prefill mode must be one of {PREFILL_MODES}, got {mode!r}")
        self.mode = mode
        self._threshold = threshold
        self._pools = {False: prefill, True: decode}
        self._prefills = prefills  # admitted prompts by where: prefill_worker / decode_worker
        self.waiting = {False: 0, True: 0}  # prompts placed whose first token has not come, by `local`

    @contextmanager
    def placed(self, prompt_tokens: int) -> Iterator[PlacedPrefill]:
        """The prompt's place by the mode's rule (see the module doc), counted while the context is
        open and the prompt waits for its first token."""
        place = PlacedPrefill(self._local(prompt_tokens), self.waiting)
        self.waiting[place.local] += 1
        try:
            yield place
        finally:
            place.prefilled()

    def admitted(self, place: PlacedPrefill) -> None:
        """Count where an admitted request's prompt is prefilled (`disagg_gateway_prefills_total`)."""
        if self._prefills is not None:
            self._prefills.labels(WHERE[place.local]).inc()

    def _local(self, prompt_tokens: int) -> bool:
        short = prompt_tokens < self._threshold
        if self.mode == "unified":
            return True
        if self.mode == "conditional":
            return short
        if self.mode == "adaptive":
            return short and self._queue(True) < self._queue(False)
        return False

    def _queue(self, local: bool) -> float:
        """Prompts waiting per serving worker of that side (no worker serving: endless)."""
        serving = sum(worker.routable for worker in self._pools[local].workers)
        return self.waiting[local] / serving if serving else float("inf")
