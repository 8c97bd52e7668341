"""Numerics of tensor attention. Every fast path has a plain reference with the same signature; `dispatch` is the
one door that picks which implementation runs."""

from .dispatch import attention, four_cache_decode, poly_tensor_attention, tensor_attention
from .exact.naive import naive_tensor_attention
from .poly.naive import naive_poly_tensor_attention

__all__ = [
    "attention",
    "four_cache_decode",
    "naive_poly_tensor_attention",
    "naive_tensor_attention",
    "poly_tensor_attention",
    "tensor_attention",
]
