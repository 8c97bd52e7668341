"""KV-cache layouts for tensor attention, chosen with `generate(cache_implementation=NAME)`."""

from .base import LAYOUTS, TensorAttnCache, TensorCacheLayer, available_cache_implementations, register_layout
from .four import FourCacheLayer

__all__ = [
    "LAYOUTS",
    "FourCacheLayer",
    "TensorAttnCache",
    "TensorCacheLayer",
    "available_cache_implementations",
    "register_layout",
]
