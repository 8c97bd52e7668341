"""Names that the cache and ops modules offer and the config is checked against. The config is the ground floor of
the package: it imports this module, never `cache` or `ops`, which fill and read it."""

from __future__ import annotations

# `cache_implementation` names, in registration order (`cache.base.register_layout` adds each layout's).
CACHE_IMPLEMENTATIONS: list[str] = []
# `tensor_attention_backend` / `backend` values besides None (automatic): see `ops.backend`.
BACKENDS = ("torch", "triton")


def check_backend(backend, name: str = "backend") -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"`{name}` must be None (automatic), 'torch' or 'triton', got {backend!r}")
