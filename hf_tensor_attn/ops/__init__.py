"""Numerics of tensor attention. Every fast path has a plain reference with the same signature."""

from .decode import four_cache_decode
from .naive import naive_tensor_attention
from .poly import naive_poly_tensor_attention, poly_tensor_attention
from .tiled import tensor_attention

__all__ = [
    "four_cache_decode",
    "naive_poly_tensor_attention",
    "naive_tensor_attention",
    "poly_tensor_attention",
    "tensor_attention",
]
