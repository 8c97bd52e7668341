"""The four-matrix layout in buffers allocated once (`static_four_cache`): what `torch.compile` and CUDA graphs need.

transformers' `StaticCache` keeps keys and values in tensors of `max_cache_len` tokens written in place, and the number
of tokens written as a tensor, so a compiled decode step never sees a shape or a Python number change. This layout
does the same for K1 | K2 and V1 | V2; a `TensorAttnCache` of this layout gives the standard layers transformers'
`StaticLayer`. The attention runs through the door with the queries' positions (`ops.dispatch`): compiled, over the
whole buffer with the unwritten tokens masked (O(L^2) per head and step for L = max_cache_len, the price of fixed
shapes; O(w1 w2) with both windows set, whose tokens are gathered); eagerly, over the tokens written, as
`four_cache` does.
"""

from __future__ import annotations

import torch

from ..ops import attention
from .base import TensorAttnCacheLayer, register_layout


@register_layout("static_four_cache")
class StaticFourCacheLayer(TensorAttnCacheLayer):
    """K1 | K2 and V1 | V2 as [B, H, max_cache_len, 2D] buffers, zero where nothing was written.

    `max_cache_len`: tokens the buffers hold (prompt and generated tokens); `generate` sizes it from `max_length` /
    `max_new_tokens`, a cache the model builds itself uses `config.max_position_embeddings`.
    """

    is_compileable = True
    is_croppable = True

    def __init__(self, constants, *, max_cache_len: int | None = None):
        if max_cache_len is not None and (isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int)
                                          or max_cache_len < 1):
            raise ValueError(f"`max_cache_len` must be a positive int (tokens the buffers hold), got {max_cache_len!r}")
        # Tokens written, as a tensor: a compiled step reads and advances it on the device, without recompiling.
        self.length = torch.zeros((), dtype=torch.long)
        super().__init__(constants, max_cache_len=max_cache_len)
        self.max_cache_len = max_cache_len

    @property
    def seen(self) -> int:
        return int(self.length)  # a host sync: the bookkeeping of beams and crops only, never a compiled step

    @seen.setter
    def seen(self, value: int) -> None:
        self.length.fill_(value)

    def allocate(self, key_states, value_states) -> None:
        if self.max_cache_len is None:
            raise ValueError("cache_implementation='static_four_cache' needs `max_cache_len` in `cache_config` (tokens "
                             "its buffers hold), e.g. cache_config={'max_cache_len': 1024}")
        B, H, _, D2 = key_states.shape
        self.keys = key_states.new_zeros(B, H, self.max_cache_len, D2)
        self.values = value_states.new_zeros(B, H, self.max_cache_len, value_states.shape[-1])
        self.length = self.length.to(key_states.device)
        if not torch.compiler.is_compiling():  # fixed addresses, which CUDA graphs need (as transformers' StaticLayer)
            for t in (self.keys, self.values, self.length):
                torch._dynamo.mark_static_address(t)

    def append(self, key_states, value_states, attention_mask) -> None:
        T = key_states.shape[-2]
        if not torch.compiler.is_compiling() and int(self.length) + T > self.max_cache_len:
            raise ValueError(f"static_four_cache holds max_cache_len={self.max_cache_len} tokens and has "
                             f"{int(self.length)}; {T} more do not fit: build it with a larger max_cache_len")
        positions = self.length + torch.arange(T, device=self.keys.device)
        self.keys.index_copy_(2, positions, key_states)
        self.values.index_copy_(2, positions, value_states)

    def advance(self, count: int) -> None:
        self.length.add_(count)  # on the device: a compiled step neither reads nor specialises on the count

    def new_token_mask(self, attention_mask, count: int):
        # Masks reach a static layer at the full width (`TensorAttnCache.full_width`).
        return attention_mask.index_select(1, self.length.to(attention_mask.device) + torch.arange(
            count, device=attention_mask.device))

    def attend(self, query, attention_mask=None):
        # The base class checks against `seen`, a host read a compiled step cannot make.
        if not self.is_initialized:
            raise ValueError("`attend` needs tokens in the cache: `update` it with the new key/value states first")
        return self.read(query, attention_mask)

    def read(self, query, attention_mask):
        positions = self.length - query.shape[2] + torch.arange(query.shape[2], device=query.device)
        return attention(self.constants, query, self.keys, self.values, attention_mask=attention_mask,
                         workspace=self.workspace, positions=positions)

    def get_seq_length(self):
        return self.length if self.is_initialized else 0  # a tensor, as transformers' StaticLayer returns

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def map_batch(self, fn) -> None:
        self.keys, self.values = fn(self.keys), fn(self.values)

    def move(self, device) -> None:
        self.keys = self.keys.to(device, non_blocking=True)
        self.values = self.values.to(device, non_blocking=True)
        self.length = self.length.to(device)

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
            self.length.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        if self.is_initialized:
            self.length.fill_(self.crop_count(tokens_to_remove, self.seen))

    def memory_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))
