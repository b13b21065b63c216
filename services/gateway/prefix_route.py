"""Cache-aware choice of workers: the gateway remembers which prefill worker prefilled which prompt
blocks, and which decode worker admitted them, and sends a prompt where the fewest of its blocks are
still to compute (prefill) or to move (decode), weighed against the workers' load (the way Dynamo's
KV router does, from the gateway's own record; one record per role).

The record names blocks like the workers' prefix caches do (a chained hash of the salt and the
tokens, services.common.prefix_keys), under a fingerprint of its own: it only has to be consistent
with itself. It holds at most `capacity` block names, least recently used out first; a worker that
has evicted a block is found out only by its slower answer, which the load term bounds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from services.common.prefix_keys import block_keys
from services.gateway.routing import Worker

# A request in flight on a prefill worker delays a new one about as much as computing this many
# prompt tokens (a rough CPU figure: a few hundred ms of forward pass).
LOAD_TOKENS = 256
# A sequence running on a decode worker slows every step there; moving a token's KV costs ~50 KB on
# the wire. A rough weighing: one running sequence as 64 tokens to move.
DECODE_LOAD_TOKENS = 64


class PrefixAffinity:
    def __init__(self, block_size: int = 16, capacity: int = 100_000, load_tokens: int = LOAD_TOKENS) -> None:
        self._block_size = block_size
        self._capacity = capacity
        self._load_tokens = load_tokens
        self._holders: OrderedDict[str, set[str]] = OrderedDict()  # block name -> worker addresses

    def keys(self, prompt: Sequence[int], salt: str) -> list[str]:
        """The names of the prompt's reusable blocks (all full blocks but the last token's)."""
        return block_keys(prompt[: len(prompt) - 1], self._block_size, "gateway", salt)

    def held(self, address: str, keys: Sequence[str]) -> int:
        """How many of the prompt's leading blocks `address` computed (as far as the record goes)."""
        count = 0
        for key in keys:
            if address not in self._holders.get(key, ()):
                break
            count += 1
        return count

    def choose(self, ranked: Sequence[Worker], keys: Sequence[str]) -> Worker:
        """The worker with the least prompt left to compute (or move) plus load."""
        return self.order(ranked, keys)[0]

    def order(self, ranked: Sequence[Worker], keys: Sequence[str]) -> list[Worker]:
        """The workers by prompt left to compute (or move) plus load; ties keep the ranking's order
        (least loaded, rotating)."""
        def cost(worker: Worker) -> int:
            held = self.held(worker.address, keys)
            return (len(keys) - held) * self._block_size + worker.active * self._load_tokens
        return sorted(ranked, key=cost)

    def record(self, address: str, keys: Sequence[str]) -> None:
        """`address` prefilled (or admitted) a prompt with these blocks, so now holds them."""
        for key in reversed(keys):  # the chain's beginning most recent: it outlives the ends
            self._holders.setdefault(key, set()).add(address)
            self._holders.move_to_end(key)
        while len(self._holders) > self._capacity:
            self._holders.popitem(last=False)
