"""ModelInfo messages from the runtime's geometry (servicer edge helper)."""

from __future__ import annotations

from services.common.pb import common_pb2
from services.common.runtime import ModelGeometry


def model_info_pb(geometry: ModelGeometry) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(fingerprint=geometry.fingerprint, name=geometry.name, dtype=geometry.dtype,
                                num_layers=geometry.num_layers, num_kv_heads=geometry.num_kv_heads,
                                head_dim=geometry.head_dim, max_model_len=geometry.max_model_len,
                                vocab_size=geometry.vocab_size)
