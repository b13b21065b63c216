"""Log-probabilities from logits (services.common.logprobs says what they are): one chosen token's
from its position's logits, or every prompt token's from the forward pass's hidden states."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from services.common.errors import InternalFailure
from services.common.logprobs import TokenLogprob

_SCORE_ROWS = 256  # prompt positions per lm_head slice: bounds the [rows, vocab] logits held at once


def _rows(logprobs: torch.Tensor, token_ids: Sequence[int], top_n: int) -> list[TokenLogprob]:
    """One TokenLogprob per row of `logprobs` [rows, vocab] for the row's token."""
    targets = torch.tensor(list(token_ids), dtype=torch.long)
    chosen = logprobs.gather(1, targets[:, None])[:, 0]
    ranks = (logprobs > chosen[:, None]).sum(dim=1) + 1
    top_values, top_ids = logprobs.topk(top_n, dim=1) if top_n else (None, None)
    out = []
    for row, token_id in enumerate(token_ids):
        top = () if top_ids is None else tuple(zip(top_ids[row].tolist(), top_values[row].tolist()))  # type: ignore[index]
        out.append(TokenLogprob(int(token_id), float(chosen[row]), int(ranks[row]), top))
    return out


def token_logprob(logits: torch.Tensor, token_id: int, top_n: int) -> TokenLogprob:
    """The chosen token's entry from one position's 1-D logits."""
    return _rows(torch.log_softmax(logits.float()[None, :], dim=-1), [token_id], top_n)[0]


def prompt_logprobs(hidden: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor],
                    next_ids: Sequence[int], top_n: int) -> list[TokenLogprob]:
    """Entries for `next_ids[i]` given position i's hidden state (`hidden` [positions, hidden]; only
    the first len(next_ids) positions are scored), computed a slice of positions at a time."""
    out: list[TokenLogprob] = []
    for start in range(0, len(next_ids), _SCORE_ROWS):
        end = min(start + _SCORE_ROWS, len(next_ids))
        logits = lm_head(hidden[start:end]).float().cpu()
        if not bool(torch.isfinite(logits).all()):  # would be NaN in the response (invalid JSON)
            raise InternalFailure("the model produced non-finite logits for the prompt")
        out.extend(_rows(torch.log_softmax(logits, dim=-1), next_ids[start:end], top_n))
    return out
