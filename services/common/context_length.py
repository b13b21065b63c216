"""How many tokens of context this system serves for a model: its `max_position_embeddings`, or
its attention's sliding window where that is shorter. The decode attends over every token of a
sequence, which is the window's own attention only while the context fits in the window, so the
gateway's length check and the workers' `max_model_len` both stop there."""

from __future__ import annotations

from typing import Any


def attention_window(config: object) -> int:
    """The sliding window a model's attention is limited to where it is shorter than the model's
    context (0: none)."""
    window = getattr(config, "sliding_window", None)
    model_type = getattr(config, "model_type", "")
    layer_types = getattr(config, "layer_types", None)
    if not isinstance(window, int) or window <= 0 or not getattr(config, "use_sliding_window", True) \
            or model_type == "llama":  # Llama's layers never read the key
        return 0
    if model_type == "qwen2" and isinstance(layer_types, list) and "sliding_attention" not in layer_types:
        return 0  # Qwen2 slides only from `max_window_layers` on: here no layer does
    return window if window < getattr(config, "max_position_embeddings", window + 1) else 0


def served_length(config: Any) -> int:
    """The longest context (prompt and output) served for the model of this config (a
    transformers `PretrainedConfig`)."""
    return attention_window(config) or int(config.max_position_embeddings)
