"""One batched decode step over the paged KV pool (runs on the model thread).

All running sequences advance one token in one forward pass: embeddings, norms, projections, MLPs
and the LM head run on the whole batch. Attention reads each sequence's blocks: a batch of one goes
through Hugging Face's own SDPA attention function, so it computes exactly what the model's forward
pass computes, over a view of the pool when the sequence's blocks are one contiguous run (no copy at
all; the usual case for a stream alone) and over a copy into a reused scratch buffer otherwise. A
larger batch copies every sequence's blocks with one `index_select` per layer into the reused scratch
buffers (padded to the longest, masked) and runs one SDPA call per layer: a fresh tensor per layer,
as plain indexing makes, costs an allocation and page faults as large as the copy itself (measured:
the indexed copy took 25-38% of a step at 8-32 sequences of 600 tokens; `index_select` into a reused
buffer takes half of that). With the C kernel (`--paged-attention`, native_attention.py) a larger
batch copies nothing: the kernel attends over every sequence's blocks where they lie. Works for
Llama-family layer layouts (Llama, Mistral, Qwen2, SmolLM).

Matrix products over several rows round differently from one row (measured on the development CPU:
`F.linear` with 1 row is a GEMV whose results differ in the last bits from any batch of 2 or more),
so a batched step's logits are not bit-identical to a batch of one. In batch-invariant mode
(`--batch-invariant`) every projection runs row by row as the GEMV a batch of one uses (the weights
of one matrix, or of one slice of the LM head, stay in cache across the rows) and attention runs per
sequence: every sequence's logits are bit-identical to a batch of one, at any batch size.

The projections and the LM head of a batched step run on oneDNN-packed copies of the weights
(`--packed-weights`, packed_weights.py: about twice as fast as `F.linear` for decode-sized batches on
CPU); a batch of one keeps the model's own products unless `--packed-weights all` asks otherwise,
and steps on the one-stream path (one_stream.py: the same operations in fewer calls) where it can.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from services.common.runtime import ModelRuntime
from services.common.packed_weights import PackedLayer, PackedWeights
from services.decode.native_attention import NativeAttention
from services.decode.one_stream import LAYER_CLASSES, KvViews, OneStream, other_layers
from services.decode.pool import BlockPool


@dataclass(frozen=True, slots=True)
class _Plan:
    """Index tensors of one batched step, shared by every layer."""

    current: torch.Tensor  # block of each sequence's new token
    offsets: torch.Tensor  # its offset in that block
    flat: torch.Tensor  # [batch * width] block tables, padded, flattened
    width: int  # blocks per sequence in the gathered view
    valid: torch.Tensor | None  # [batch, 1, 1, width * block_size] attention mask (SDPA only)
    lengths: torch.Tensor  # [batch] tokens to attend over (the new one included), int64


@dataclass(frozen=True, slots=True)
class _Span:
    """Where one sequence's KV lies for a per-sequence step: its first `count` blocks, either one
    contiguous run starting at `first` (attended in place) or scattered (`index`, copied out)."""

    first: int | None
    index: torch.Tensor | None
    count: int
    length: int  # tokens to attend over (the new one included)


@dataclass(frozen=True, slots=True)
class StepSlot:
    """One sequence in a step: its block table, the position of the token it feeds, the token."""

    blocks: list[int]
    position: int
    token: int


ROW_SLICE_BYTES = 8 * 1024 * 1024  # a weight slice this large stays in cache while every row passes


def rowwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed for each row on its own (as a batch of one would), slice
    by slice of the weight so the slice is read from memory once for all rows."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    # whole fours of rows: MKL sums a matrix's last `rows mod 4` rows in another order than the rest
    # (services/decode/exact_gemv.py), so any other slice would give those rows other bits
    step = max(4, ROW_SLICE_BYTES // (weight.shape[1] * weight.element_size()) // 4 * 4)
    for start in range(0, weight.shape[0], step):
        part = weight[start : start + step]
        for row in range(rows.shape[0]):
            out[row, start : start + step] = torch.nn.functional.linear(rows[row : row + 1], part)[0]
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


def check_layers(model: torch.nn.Module) -> None:
    """Raise ValueError unless the decode computes `model`'s layers (stepped as a Llama, another
    model's logits would be wrong: refused, not served)."""
    other = other_layers(model)
    if other:
        raise ValueError(f"the decode computes the layers of Llama, Mistral and Qwen2 models "
                         f"({', '.join(LAYER_CLASSES)}), not {', '.join(other)}")


class Scratch:
    """Buffers the per-step KV copies land in, reused across layers and steps (a fresh tensor per
    layer costs an allocation and page faults as large as the copy itself)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, like: torch.Tensor, blocks: int) -> torch.Tensor:
        """A [blocks, *like.shape[1:]] buffer (its contents are garbage)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < blocks or buffer.shape[1:] != like.shape[1:] \
                or buffer.dtype != like.dtype:
            buffer = torch.empty((blocks, *like.shape[1:]), dtype=like.dtype, device=like.device)
            self._buffers[name] = buffer
        return buffer[:blocks]


class PagedRunner:
    def __init__(self, runtime: ModelRuntime, pool: BlockPool, batch_invariant: bool = False,
                 packed: PackedWeights | None = None, attention: NativeAttention | None = None,
                 one_stream: OneStream | None = None) -> None:
        """`packed`: steps of 2+ sequences run on these weights (built by `PackedWeights.build` on the
        model thread), and a batch of one too when `packed.for_one`. Batch-invariant steps compute
        every row as a batch of one, with the model's own products. `attention`: the C kernel that
        batched steps attend with (None: SDPA over gathered blocks). `one_stream`: the path a batch
        of one steps on, unless packed (None: the model's modules)."""
        if batch_invariant and packed is not None and packed.for_one:
            raise ValueError("batch-invariant steps need a batch of one's own products: "
                             "packed weights batched or off, not all")
        check_layers(runtime.model)
        self._model = runtime.model
        self._device = runtime.device
        self._pool = pool
        self._batch_invariant = batch_invariant
        self._scratch = Scratch()
        self._packed = None if batch_invariant else packed
        self._packed_min_rows = 1 if packed is not None and packed.for_one else 2
        self._native = attention
        self._one = None if self.packs(1) else one_stream

    def packs(self, rows: int) -> bool:
        """Whether a step of this many sequences runs on the packed weights."""
        return self._packed is not None and rows >= self._packed_min_rows

    # The model's modules are Hugging Face's, their parts found by name: typed Any below (nn.Module's
    # attribute lookup types them Tensor | Module).
    def _project(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        if self._batch_invariant and x.shape[0] > 1:
            return rowwise_linear(x, module.weight, module.bias)
        return module(x)

    def _mlp(self, mlp: Any, x: torch.Tensor, packed: PackedLayer | None) -> torch.Tensor:
        if packed is not None:
            gate, up = packed.gate_up(x)
            return packed.down(mlp.act_fn(gate) * up)[0]
        if not self._batch_invariant or x.shape[0] == 1:
            return mlp(x)
        return self._project(mlp.down_proj, mlp.act_fn(self._project(mlp.gate_proj, x)) * self._project(mlp.up_proj, x))

    @torch.inference_mode()
    def step(self, batch: list[StepSlot]) -> torch.Tensor:
        """Logits [batch, vocab] (float32, CPU) of the next token of every sequence."""
        if len(batch) == 1 and self._one is not None:
            return self._one.step(batch[0].token, batch[0].position, self._kv_views(batch[0]))
        body: Any = self._model.model
        ids = torch.tensor([[slot.token] for slot in batch], device=self._device)
        positions = torch.tensor([[slot.position] for slot in batch], device=self._device)
        hidden = body.embed_tokens(ids)
        rope = body.rotary_emb(hidden, positions)
        plan = self._plan(batch) if len(batch) > 1 and not self._batch_invariant else None
        spans = [] if plan is not None else [self._span(slot) for slot in batch]
        packed = self._packed if self.packs(len(batch)) else None
        for index, layer in enumerate(body.layers):
            packed_layer = None if packed is None else packed.layers[index]
            residual = hidden
            hidden = self._attention(layer.self_attn, index, layer.input_layernorm(hidden), rope, batch, plan, spans,
                                     packed_layer)
            hidden = residual + hidden
            residual = hidden
            hidden = residual + self._mlp(layer.mlp, layer.post_attention_layernorm(hidden), packed_layer)
        normed = body.norm(hidden)
        logits = self._project(self._model.lm_head, normed) if packed is None else packed.lm_head(normed)[0]
        return logits[:, -1].float().cpu()

    def _plan(self, batch: list[StepSlot]) -> _Plan:
        size, device = self._pool.block_size, self._device
        positions = torch.tensor([slot.position for slot in batch], device=device)
        width = max(slot.position // size + 1 for slot in batch)
        tables = [slot.blocks[:width] + [0] * (width - len(slot.blocks[:width])) for slot in batch]
        valid = None if self._native is not None else \
            (torch.arange(width * size, device=device)[None, :] <= positions[:, None])[:, None, None, :]
        return _Plan(torch.tensor([slot.blocks[slot.position // size] for slot in batch], device=device),
                     positions % size, torch.tensor(tables, device=device).flatten(), width, valid, positions + 1)

    def _span(self, slot: StepSlot) -> _Span:
        count = slot.position // self._pool.block_size + 1
        blocks = slot.blocks[:count]
        if blocks == list(range(blocks[0], blocks[0] + count)):
            return _Span(blocks[0], None, count, slot.position + 1)
        return _Span(None, torch.tensor(blocks, device=self._device), count, slot.position + 1)

    def _store(self, layer: int, slot: StepSlot, key: torch.Tensor, value: torch.Tensor) -> None:
        """The new token's key and value [kv_heads, head_dim] into its place in the pool."""
        size = self._pool.block_size
        block, offset = slot.blocks[slot.position // size], slot.position % size
        self._pool.keys[layer][block, offset] = key
        self._pool.values[layer][block, offset] = value

    def _kv_views(self, slot: StepSlot) -> KvViews:
        span = self._span(slot)

        def store_and_view(layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self._store(layer, slot, key, value)
            return self._sequence_kv(layer, span)
        return store_and_view

    def _sequence_kv(self, layer: int, span: _Span) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's keys and values [1, kv_heads, length, head_dim] of one layer: a view of
        the pool when its blocks are one run, else copied into the scratch buffers."""
        pool_keys, pool_values = self._pool.keys[layer], self._pool.values[layer]
        if span.first is not None:
            keys, values = (pool_keys[span.first : span.first + span.count],
                            pool_values[span.first : span.first + span.count])
        else:
            index = cast(torch.Tensor, span.index)  # a span has its first block or else its index (_span)
            keys = torch.index_select(pool_keys, 0, index, out=self._scratch.take("k", pool_keys, span.count))
            values = torch.index_select(pool_values, 0, index,
                                        out=self._scratch.take("v", pool_values, span.count))
        return (keys.flatten(0, 1)[: span.length].transpose(0, 1).unsqueeze(0),
                values.flatten(0, 1)[: span.length].transpose(0, 1).unsqueeze(0))

    def _attention(self, attention: Any, layer: int, hidden: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor], batch: list[StepSlot], plan: _Plan | None,
                   spans: list[_Span], packed: PackedLayer | None) -> torch.Tensor:
        input_shape = hidden.shape[:-1]
        hidden_shape = (*input_shape, -1, attention.head_dim)
        if packed is not None:
            projected = packed.qkv(hidden)
        else:
            projected = tuple(self._project(p, hidden) for p in (attention.q_proj, attention.k_proj, attention.v_proj))
        query, key, value = (part.view(hidden_shape).transpose(1, 2) for part in projected)
        query, key = apply_rotary_pos_emb(query, key, *rope)
        if plan is not None:
            output = self._batched(attention, layer, query, key, value, plan).reshape(*input_shape, -1)
        else:
            output = self._each(attention, layer, query, key, value, batch, spans).reshape(*input_shape, -1)
        return self._project(attention.o_proj, output.contiguous()) if packed is None else packed.o(output)[0]

    def _each(self, attention: Any, layer: int, query: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor, batch: list[StepSlot], spans: list[_Span]) -> torch.Tensor:
        """Attention of each sequence on its own, over its blocks: [batch, 1, heads, head_dim]."""
        outputs = []
        for row, (slot, span) in enumerate(zip(batch, spans)):
            self._store(layer, slot, key[row, :, 0], value[row, :, 0])
            keys, values = self._sequence_kv(layer, span)
            output, _ = sdpa_attention_forward(attention, query[row : row + 1], keys, values, None, dropout=0.0,
                                               scaling=attention.scaling)
            outputs.append(output)
        return torch.cat(outputs)

    def _batched(self, attention: Any, layer: int, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Attention of every sequence at once: [batch, 1, heads, head_dim]."""
        pool_keys, pool_values = self._pool.keys[layer], self._pool.values[layer]
        pool_keys[plan.current, plan.offsets] = key[:, :, 0]
        pool_values[plan.current, plan.offsets] = value[:, :, 0]
        if self._native is not None:
            return self._native.attend(query, pool_keys, pool_values, plan.flat.view(query.shape[0], plan.width),
                                       plan.lengths, attention.scaling).transpose(1, 2)
        blocks, batch = plan.flat.shape[0], query.shape[0]
        keys = torch.index_select(pool_keys, 0, plan.flat, out=self._scratch.take("k", pool_keys, blocks))
        values = torch.index_select(pool_values, 0, plan.flat, out=self._scratch.take("v", pool_values, blocks))
        keys = keys.view(batch, -1, *pool_keys.shape[2:]).transpose(1, 2)
        values = values.view(batch, -1, *pool_values.shape[2:]).transpose(1, 2)
        output = torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=plan.valid, scale=attention.scaling,
            enable_gqa=keys.shape[1] != query.shape[1])
        return output.transpose(1, 2)
