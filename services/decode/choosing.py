"""How the decode chooses a sequence's next token, and records it.

On the model thread (`choose`): the logit controls' view of the sequence's history, its grammar's
mask (structured output), the sampled token, and its log-probability when asked (from the logits
before any control reshaped them). On the event loop (`accept`): the grammar advanced past the token,
and the token marked when it completes the grammar. The two never overlap for one sequence: the
scheduler runs a sequence's step only after its previous token was accepted.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import torch

from services.common.errors import InvalidRequest
from services.common.grammar import GrammarState
from services.common.logit_controls import TokenContext
from services.common.runtime import ModelRuntime
from services.common.sampling import sample
from services.common.scoring import token_logprob
from services.decode.sequence import Sequence, Token


class TokenChooser:
    def __init__(self, runtime: ModelRuntime) -> None:
        self._runtime = runtime

    async def grammar(self, sequence: Sequence) -> GrammarState | None:
        """A structured-output request's grammar, past the completion so far (a failover moved it into
        the prompt); compiled off the event loop."""
        if sequence.sampling.constraint is None:
            return None
        prompt, offset = sequence.prompt_ids, sequence.position_offset
        if not 0 <= offset < len(prompt):
            raise InvalidRequest(f"position_offset {offset} must be below the prompt's length")
        return await asyncio.to_thread(self._runtime.grammars.start, sequence.sampling.constraint,
                                       prompt[len(prompt) - offset :])

    def choose(self, logits: torch.Tensor, sequence: Sequence) -> Token | Exception:
        """The sequence's next token (or why it has none: only this sequence fails)."""
        try:
            index = sequence.completion_index
            allowed = None if sequence.grammar is None else sequence.grammar.allowed()
            token_id = sample(logits, sequence.sampling, index, self.context(sequence), allowed)
            top_n = sequence.sampling.logprobs
            return Token(token_id, index, None if top_n is None else token_logprob(logits, token_id, top_n),
                         choice=sequence.choice)
        except Exception as error:  # noqa: BLE001 - only this sequence fails
            return error

    def context(self, sequence: Sequence) -> TokenContext | None:
        """The tokens the logit controls see (built only for a request that uses them): the prompt,
        whose last `position_offset` tokens were generated before a failover, then the completion."""
        if not sequence.sampling.reshapes_logits:
            return None
        return TokenContext(sequence.prompt_ids + sequence.generated,
                            len(sequence.prompt_ids) - sequence.position_offset, self._runtime.geometry.eos_token_ids)

    @staticmethod
    def accept(sequence: Sequence, token: Token) -> Token:
        """The token as it goes out, once its grammar (if any) took it; raises InternalFailure if the
        grammar cannot."""
        if sequence.grammar is None:
            return token
        sequence.grammar.consume(token.token_id)
        return replace(token, ends_output=True) if sequence.grammar.finished else token
