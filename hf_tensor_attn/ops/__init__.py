"""Numerics of tensor attention. Every fast path has a plain reference with the same signature."""

from .decode import four_cache_decode
from .tiled import tensor_attention
from .naive import naive_tensor_attention

__all__ = ["four_cache_decode", "naive_tensor_attention", "tensor_attention"]
