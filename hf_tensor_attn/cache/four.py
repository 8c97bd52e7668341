"""The four-matrix layout (paper Def. 3.7): K1, K2, V1, V2 per layer, O(n d) memory, O(n^2 d) per decode step."""

from __future__ import annotations

from ..ops import attention
from .base import TensorAttnCacheLayer, register_layout


@register_layout("four_cache")
class FourCacheLayer(TensorAttnCacheLayer):
    """Stores keys as [B, H, T, 2D] (k1 | k2) and values as [B, H, T, 2D] (v1 | v2).

    `keys` / `values` are views of buffers with spare capacity that grow by doubling: appending a token copies
    O(d) numbers (amortised), where concatenation would copy the whole cache into a fresh tensor at every step.
    `memory_bytes()` counts the buffers, spare capacity included.
    """

    is_croppable = True

    def allocate(self, key_states, value_states) -> None:
        B, H, _, D2 = key_states.shape
        self.key_buffer = key_states.new_empty(B, H, 0, D2)  # [B, H, capacity, 2D]
        self.value_buffer = value_states.new_empty(B, H, 0, D2)
        self.keys, self.values = self.key_buffer, self.value_buffer

    def append(self, key_states, value_states, attention_mask) -> None:
        n, T = self.seen, key_states.shape[-2]
        if n + T > self.key_buffer.shape[2]:
            # First fill: exactly the tokens given; later: at least double.
            capacity = n + T if n == 0 else max(n + T, 2 * self.key_buffer.shape[2])
            self.key_buffer = self._grown(self.keys, capacity, key_states)
            self.value_buffer = self._grown(self.values, capacity, value_states)
        self.key_buffer.narrow(2, n, T).copy_(key_states)
        self.value_buffer.narrow(2, n, T).copy_(value_states)
        self.keys, self.values = self.key_buffer.narrow(2, 0, n + T), self.value_buffer.narrow(2, 0, n + T)

    @staticmethod
    def _grown(live, capacity, like):
        """A buffer of `capacity` tokens holding `live` ([B, H, n, 2D]) at its start."""
        buffer = like.new_empty(live.shape[0], live.shape[1], capacity, live.shape[3])
        buffer[:, :, : live.shape[2]] = live
        return buffer

    def read(self, query, attention_mask):
        return attention(self.constants, query, self.keys, self.values, attention_mask=attention_mask,
                         workspace=self.workspace, checked=True)

    def map_batch(self, fn) -> None:
        """Apply a batch-dimension map to the live tokens, keeping the buffers' capacity."""
        capacity = self.key_buffer.shape[2]
        for live_name, buffer_name in (("keys", "key_buffer"), ("values", "value_buffer")):
            buffer = self._grown(fn(getattr(self, live_name)), capacity, getattr(self, buffer_name))
            setattr(self, buffer_name, buffer)
            setattr(self, live_name, buffer[:, :, : self.seen])

    def move(self, device) -> None:
        self.key_buffer = self.key_buffer.to(device, non_blocking=True)
        self.value_buffer = self.value_buffer.to(device, non_blocking=True)
        self.keys, self.values = self.key_buffer[:, :, : self.seen], self.value_buffer[:, :, : self.seen]

    def crop(self, tokens_to_remove: int) -> None:
        if self.is_initialized:
            self.seen = self.crop_count(tokens_to_remove, self.seen)
            self.keys, self.values = self.key_buffer[:, :, : self.seen], self.value_buffer[:, :, : self.seen]

    def memory_bytes(self) -> int:
        """Bytes held: the key and value buffers, spare capacity included."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.key_buffer, self.value_buffer))
