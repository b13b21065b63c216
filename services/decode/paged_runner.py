"""One batched decode step over the paged KV pool (runs on the model thread).

All running sequences advance one token in one forward pass: embeddings, norms, projections, MLPs
and the LM head run on the whole batch; attention runs per sequence over its own blocks, through
Hugging Face's SDPA attention function, so a batch of one computes exactly what the model's own
forward pass computes. Works for Llama-family layer layouts (Llama, Mistral, Qwen2, SmolLM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from services.common.runtime import ModelRuntime
from services.decode.blocks import BlockPool


@dataclass(frozen=True, slots=True)
class StepSlot:
    """One sequence in a step: its block table, the position of the token it feeds, the token."""

    blocks: list[int]
    position: int
    token: int


class PagedRunner:
    def __init__(self, runtime: ModelRuntime, pool: BlockPool) -> None:
        self._model = runtime.model
        self._device = runtime.device
        self._pool = pool

    @torch.inference_mode()
    def step(self, batch: list[StepSlot]) -> torch.Tensor:
        """Logits [batch, vocab] (float32, CPU) of the next token of every sequence."""
        body = self._model.model
        ids = torch.tensor([[slot.token] for slot in batch], device=self._device)
        positions = torch.tensor([[slot.position] for slot in batch], device=self._device)
        hidden = body.embed_tokens(ids)
        rope = body.rotary_emb(hidden, positions)
        for index, layer in enumerate(body.layers):
            residual = hidden
            hidden = self._attention(layer.self_attn, index, layer.input_layernorm(hidden), rope, batch)
            hidden = residual + hidden
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
        return self._model.lm_head(body.norm(hidden))[:, -1].float().cpu()

    def _attention(self, attention: torch.nn.Module, layer: int, hidden: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor], batch: list[StepSlot]) -> torch.Tensor:
        input_shape = hidden.shape[:-1]
        hidden_shape = (*input_shape, -1, attention.head_dim)
        query = attention.q_proj(hidden).view(hidden_shape).transpose(1, 2)
        key = attention.k_proj(hidden).view(hidden_shape).transpose(1, 2)
        value = attention.v_proj(hidden).view(hidden_shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *rope)
        outputs = []
        for row, slot in enumerate(batch):
            self._pool.write(slot.blocks, layer, slot.position, key[row], value[row])
            keys, values = self._pool.read(slot.blocks, layer, slot.position + 1)
            output, _ = sdpa_attention_forward(attention, query[row : row + 1], keys.unsqueeze(0).contiguous(),
                                               values.unsqueeze(0).contiguous(), None, dropout=0.0,
                                               scaling=attention.scaling)
            outputs.append(output)
        return attention.o_proj(torch.cat(outputs).reshape(*input_shape, -1).contiguous())
