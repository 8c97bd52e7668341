"""The four-matrix layout (paper Def. 3.7): K1, K2, V1, V2 per layer, O(n d) memory, O(n^2 d) per decode step."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ..ops import four_cache_decode, tensor_attention
from .base import TensorCacheLayer, register_layout


@register_layout("four_cache")
class FourCacheLayer(DynamicLayer, TensorCacheLayer):
    """Stores keys as [B, H, T, 2D] (k1 | k2) and values as [B, H, T, 2D] (v1 | v2).

    Packing both streams along the features lets `DynamicLayer`'s cropping work unchanged. It is also what
    `DynamicCache(config)` builds for `"tensor_attention"` layers.

    `keys` / `values` are views of buffers with spare capacity that grow by doubling: appending a token copies
    O(d) numbers (amortised), where `DynamicLayer`'s concatenation copies the whole cache, into a freshly
    allocated tensor, at every step. `memory_bytes()` counts the buffers, spare capacity included.
    """

    _layer_type = "tensor_attention"

    def __init__(self, **cache_config):
        self.check_cache_config(cache_config)
        super().__init__()
        self.key_buffer = self.value_buffer = None  # [B, H, capacity, 2D]

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        B, H, _, D2 = key_states.shape
        self.key_buffer = key_states.new_empty(B, H, 0, D2)
        self.value_buffer = value_states.new_empty(B, H, 0, D2)
        self.keys, self.values = self.key_buffer, self.value_buffer

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, T = self.get_seq_length(), key_states.shape[-2]
        if not self._views_buffers() or n + T > self.key_buffer.shape[2]:
            # First fill: exactly the tokens given; later: at least double (and re-home keys that a transformers
            # method replaced by a tensor of its own).
            capacity = n + T if n == 0 else max(n + T, 2 * self.key_buffer.shape[2])
            self.key_buffer = self._grown(self.keys, n, capacity, key_states)
            self.value_buffer = self._grown(self.values, n, capacity, value_states)
        self.key_buffer[:, :, n : n + T] = key_states
        self.value_buffer[:, :, n : n + T] = value_states
        self.keys, self.values = self.key_buffer[:, :, : n + T], self.value_buffer[:, :, : n + T]
        return self.keys, self.values

    @staticmethod
    def _grown(live, n, capacity, like):
        buffer = like.new_empty(like.shape[0], like.shape[1], capacity, like.shape[3])
        if n:
            buffer[:, :, :n] = live[:, :, :n]
        return buffer

    def _views_buffers(self) -> bool:
        """Whether keys / values are still prefixes of the buffers (true unless a batch op or offload replaced them)."""
        return all(
            live is not None
            and buffer is not None
            and live.data_ptr() == buffer.data_ptr()
            and live.shape[:2] == buffer.shape[:2]
            and live.stride() == buffer.stride()
            for live, buffer in ((self.keys, self.key_buffer), (self.values, self.value_buffer))
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            idx = beam_idx.to(self.keys.device)
            if not torch.equal(idx, torch.arange(len(idx), device=idx.device)):  # identity: nothing moves
                self._map_batch(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._map_batch(lambda t: t[indices, ...])

    def _map_batch(self, fn) -> None:
        """Apply a batch-dimension map to the live tokens, keeping the buffers' capacity."""
        n, capacity = self.get_seq_length(), self.key_buffer.shape[2]
        for live_name, buffer_name in (("keys", "key_buffer"), ("values", "value_buffer")):
            live = fn(getattr(self, live_name))  # [B', H, n, 2D]
            buffer = self._grown(live, n, capacity, live)
            setattr(self, buffer_name, buffer)
            setattr(self, live_name, buffer[:, :, :n])

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = None
        super().reset()

    def offload(self):
        super().offload()
        self.key_buffer, self.value_buffer = self.keys, self.values

    def prefetch(self):
        super().prefetch()
        self.key_buffer, self.value_buffer = self.keys, self.values

    def attend(self, query, *, scale, w1=None, w2=None, attention_mask=None):
        k1, k2 = self.keys.chunk(2, dim=-1)  # [B, H, T, D] views each
        v1, v2 = self.values.chunk(2, dim=-1)
        # One decode position takes the GEMM-shaped single-query kernel; longer chunks the tiled exact op.
        op = four_cache_decode if query.shape[2] == 1 else tensor_attention
        return op(query, k1, k2, v1, v2, scale=scale, w1=w1, w2=w2, attention_mask=attention_mask)

    def memory_bytes(self) -> int:
        """Bytes held: the key and value buffers, spare capacity included."""
        if not self.is_initialized:
            return 0
        held = 0
        for live, buffer in ((self.keys, self.key_buffer), (self.values, self.value_buffer)):
            t = buffer if self._views_buffers() else live
            held += t.numel() * t.element_size()
        return held
