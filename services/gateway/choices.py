"""The choices of one request (sampling.n, best_of): what the client has of each so far, and the
best_of selection.

All choices start in one try on one decode worker (the prompt is prefilled once, its KV blocks are
shared there); a choice whose worker disappears resumes on its own, as a one-choice request under
its own worker id (the request's for choice 0, `{request id}-c{index}` for the others, the ids the
decode gave them) and seed (the request's + index), so it continues exactly where it stood.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace

from services.common.errors import InvalidRequest
from services.common.logprobs import TokenLogprob
from services.common.sampling import MAX_CHOICES, Sampling
from services.gateway.attempt import Timeline
from services.gateway.outputs import GenerateOutput
from services.gateway.text import TextStream
from services.gateway.tools import ToolCallStream


@dataclass(slots=True)
class ChoiceProgress:
    """One choice as the client has it so far."""

    index: int
    worker_id: str  # its KV's id on the workers when it runs alone (after a failover)
    sampling: Sampling  # how it samples alone: its own seed, n = 1
    stream: TextStream
    timeline: Timeline
    generated: list[int] = field(default_factory=list)
    ended: bool = False  # its last token completed the output's grammar
    finish: str | None = None  # set once the client has its end
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # choice 0's, when asked: every choice's first output has them
    tool_stream: ToolCallStream | None = None  # with tools: content out as it comes, calls at the end


def check_best_of(best_of: int, sampling: Sampling) -> None:
    """best_of (0: none) must cover n and stay within the choices one request may have."""
    if best_of and not sampling.n <= best_of <= MAX_CHOICES:
        raise InvalidRequest(f"best_of must be in [n={sampling.n}, {MAX_CHOICES}], got {best_of}")


def workers_sampling(sampling: Sampling, best_of: int) -> Sampling:
    """What the workers are asked for: best_of choices, each token's log-probability when the
    selection needs them."""
    if not best_of:
        return sampling
    return replace(sampling, n=best_of, logprobs=0 if sampling.logprobs is None else sampling.logprobs)


def mean_logprob(outputs: list[GenerateOutput]) -> float:
    """What best_of ranks choices by (OpenAI's "highest log probability per token")."""
    scores = [entry.logprob for output in outputs for entry in output.logprobs]
    return sum(scores) / len(scores) if scores else float("-inf")


async def best_of_choices(outputs: AsyncIterator[GenerateOutput], n: int,
                          keep_logprobs: bool) -> AsyncGenerator[GenerateOutput, None]:
    """Every choice's outputs once all have finished: the n best, renumbered 0 .. n-1 by rank."""
    by_choice: dict[int, list[GenerateOutput]] = {}
    async for output in outputs:
        by_choice.setdefault(output.choice, []).append(output)
    ranked = sorted(by_choice, key=lambda choice: (-mean_logprob(by_choice[choice]), choice))[:n]
    for rank, choice in enumerate(ranked):
        for output in by_choice[choice]:
            yield replace(output, choice=rank, logprobs=output.logprobs if keep_logprobs else ())
