"""What every tensor-attention cache layout shares: the layer interface, the registry of layouts by
`cache_implementation` name, and the `Cache` that mixes tensor layouts with transformers' standard layers.

A tensor layer hands the cache its new key states as one [B, H, T, 2D] tensor (k1 | k2 along the features)
and its value states as [B, H, T, 2D] (v1 | v2), through the usual `Cache.update(...)`. Then it asks the
layer to `attend(query, ...)` over whatever that layout holds, so the attention module never branches on the
layout: each layout owns both its storage and its decode maths.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

LAYOUTS: dict[str, type["TensorCacheLayer"]] = {}


def register_layout(name: str):
    """Class decorator: make a `TensorCacheLayer` subclass available as `cache_implementation=name`."""

    def wrap(cls):
        LAYOUTS[name] = cls
        cls.layout_name = name
        return cls

    return wrap


class TensorCacheLayer(CacheLayerMixin):
    """Cache of one tensor-attention layer. Subclasses choose what they store and how a query attends to it."""

    layout_name: str = ""
    # cache_config keys this layout accepts; anything else is a user error, reported by `check_cache_config`.
    config_keys: tuple[str, ...] = ()

    @classmethod
    def check_cache_config(cls, cache_config: dict) -> None:
        unknown = sorted(set(cache_config) - set(cls.config_keys))
        if unknown:
            allowed = list(cls.config_keys) or "none"
            raise ValueError(
                f"`cache_config` has keys {unknown} that cache_implementation={cls.layout_name!r} does not use; "
                f"allowed keys: {allowed}"
            )

    @abstractmethod
    def attend(self, query: torch.Tensor, *, scale: float, w1=None, w2=None, attention_mask=None) -> torch.Tensor:
        """Tensor attention of `query` [B, H, Tq, D] (the last Tq positions seen) over what the layer holds.

        `attention_mask` is the [B, T] 0/1 mask of every position seen so far, `None` when all are real.
        Returns [B, H, Tq, D].
        """

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes of tensor storage this layer holds right now."""


def layer_memory_bytes(layer) -> int:
    """Bytes held by any cache layer: a tensor layout reports its own, a standard layer holds keys and values."""
    if isinstance(layer, TensorCacheLayer):
        return layer.memory_bytes()
    held = 0
    for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
        if isinstance(t, torch.Tensor):
            held += t.numel() * t.element_size()
    return held


class TensorAttnCache(DynamicCache):
    """A dynamic cache whose tensor-attention layers use the layout `cache_implementation` and whose standard
    layers use transformers' `DynamicLayer`.

    Args:
        config: the model's `TensorAttnConfig` (its `layer_types` decide the layer classes).
        cache_implementation: one of `available_cache_implementations()`; defaults to the config's.
        cache_config: options of that layout (e.g. `{"max_memory_bytes": ...}` for `"two_cache"`).
    """

    def __init__(self, config, cache_implementation: str | None = None, cache_config: dict | None = None):
        name = cache_implementation or config.default_cache_implementation
        if name not in LAYOUTS:
            raise ValueError(
                f"`cache_implementation` must be one of {available_cache_implementations()}, got {name!r}"
            )
        layout = LAYOUTS[name]
        cache_config = dict(cache_config or {})
        layout.check_cache_config(cache_config)
        layers = [
            layout(**cache_config) if layer_type == "tensor_attention" else DynamicLayer()
            for layer_type in config.layer_types
        ]
        Cache.__init__(self, layers=layers)
        self.cache_implementation = name

    def memory_bytes(self) -> int:
        """Bytes of tensor storage held by all layers."""
        return sum(layer_memory_bytes(layer) for layer in self.layers)


def available_cache_implementations() -> list[str]:
    return list(LAYOUTS)
