"""KV-cache layouts for tensor attention, chosen with `generate(cache_implementation=NAME)`; see `base` for the
protocol every layout follows."""

from .base import (
    LAYOUTS,
    TensorAttnCache,
    TensorAttnConstants,
    TensorAttnCacheLayer,
    available_cache_implementations,
    register_layout,
)
from .four import FourCacheLayer
from .poly import PolyCacheLayer, PolyCacheMemoryError
from .static import StaticFourCacheLayer
from .subgen import StandardSubGenCacheLayer, SubGen2CacheLayer, SubGen4CacheLayer
from .two import TwoCacheLayer, TwoCacheMemoryError

__all__ = [
    "LAYOUTS",
    "FourCacheLayer",
    "PolyCacheLayer",
    "PolyCacheMemoryError",
    "StandardSubGenCacheLayer",
    "StaticFourCacheLayer",
    "SubGen2CacheLayer",
    "SubGen4CacheLayer",
    "TensorAttnCache",
    "TensorAttnConstants",
    "TensorAttnCacheLayer",
    "TwoCacheLayer",
    "TwoCacheMemoryError",
    "available_cache_implementations",
    "register_layout",
]
