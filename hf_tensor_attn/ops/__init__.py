"""Numerics of tensor attention, one sub-package per op (`exact`, `poly`, `subgen`), each with its plain reference
`naive.py` beside its fast paths (same signatures). `dispatch` is the one door that picks which implementation runs;
`common` holds the conventions every op shares, `backend` and `extension` the Triton policy and the C++ build."""

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
