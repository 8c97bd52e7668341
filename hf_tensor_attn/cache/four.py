"""The four-matrix layout (paper Def. 3.7): K1, K2, V1, V2 per layer, O(n d) memory, O(n^2 d) per decode step."""

from __future__ import annotations

from transformers.cache_utils import DynamicLayer

from ..ops import four_cache_decode, tensor_attention
from .base import TensorCacheLayer, register_layout


@register_layout("four_cache")
class FourCacheLayer(DynamicLayer, TensorCacheLayer):
    """Stores keys as [B, H, T, 2D] (k1 | k2) and values as [B, H, T, 2D] (v1 | v2).

    Packing both streams along the features lets `DynamicLayer` do the growing, cropping, beam reordering and
    batch selection unchanged. It is also what `DynamicCache(config)` builds for `"tensor_attention"` layers.
    """

    _layer_type = "tensor_attention"

    def __init__(self, **cache_config):
        self.check_cache_config(cache_config)
        super().__init__()

    def attend(self, query, *, scale, w1=None, w2=None, attention_mask=None):
        k1, k2 = self.keys.chunk(2, dim=-1)  # [B, H, T, D] views each
        v1, v2 = self.values.chunk(2, dim=-1)
        # One decode position takes the GEMM-shaped single-query kernel; longer chunks the tiled exact op.
        op = four_cache_decode if query.shape[2] == 1 else tensor_attention
        return op(query, k1, k2, v1, v2, scale=scale, w1=w1, w2=w2, attention_mask=attention_mask)

    def memory_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
