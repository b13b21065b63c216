"""Where a prompt is prefilled (`--prefill-mode`): on a prefill worker, which hands its KV over, or on
the decode worker that admitted the request, which computes it into its own blocks.

  disaggregated  a prefill worker, always
  unified        the decode worker, always (no prefill worker is used)
  conditional    the decode worker when the prompt is shorter than --conditional-threshold tokens
  adaptive       a prompt shorter than --conditional-threshold goes to the shorter queue: the least
                 busy serving prefill worker's (prompts this gateway has in flight on it) or the
                 decode workers' own (prompts this gateway has them prefilling and whose first token
                 has not come yet, per serving decode worker). Ties, longer prompts and a queue-free
                 system go to a prefill worker; with no prefill worker serving, a short prompt goes
                 to the decode worker rather than fail.

Adaptive is conditional disaggregation driven by load (as NVIDIA Dynamo's router does it): when a
burst of short prompts queues on the prefill workers while the decode workers' cores wait for them,
both sides prefill at once. A local prefill stalls its decode worker's running streams for its
forward pass, which is why only short prompts may take that way. The figures are this gateway's
own view: each gateway of several balances what it sends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import Counter

from services.gateway.routing import WorkerPool


class PrefillPlacement:
    def __init__(self, mode: str, threshold: int, prefill: WorkerPool, decode: WorkerPool,
                 prefills: Counter | None = None) -> None:
        self.mode = mode
        self._threshold = threshold
        self._prefill = prefill
        self._decode = decode
        self._prefills = prefills  # by where: prefill_worker / decode_worker
        self.local_in_flight = 0  # prompts the decode workers prefill whose first token has not come

    def local(self, prompt_tokens: int) -> bool:
        """Whether the decode worker prefills this prompt (the mode's rule; see the module doc)."""
        short = prompt_tokens < self._threshold
        if self.mode == "unified":
            local = True
        elif self.mode == "conditional":
            local = short
        elif self.mode == "adaptive":
            local = short and self._local_queue() < self._remote_queue()
        else:
            local = False
        if self._prefills is not None:
            self._prefills.labels("decode_worker" if local else "prefill_worker").inc()
        return local

    @contextmanager
    def local_prefill(self) -> Iterator[Callable[[], None]]:
        """Count a local prefill in flight until the callable it yields is called (its first token
        came) or the context ends, whichever is first. Enter it right after `local()` said so, with
        no await between, so that concurrent requests see each other."""
        pending = True

        def done() -> None:
            nonlocal pending
            if pending:
                pending = False
                self.local_in_flight -= 1

        self.local_in_flight += 1
        try:
            yield done
        finally:
            done()

    def _remote_queue(self) -> float:
        return min((worker.active for worker in self._prefill.workers if worker.routable), default=float("inf"))

    def _local_queue(self) -> float:
        serving = sum(worker.routable for worker in self._decode.workers)
        return self.local_in_flight / max(1, serving)
