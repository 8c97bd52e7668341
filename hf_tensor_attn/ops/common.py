"""Input validation and the allowed-pair mask shared by every tensor-attention op.

Conventions (all ops): q is [B, H, Tq, D]; k1, k2, v1, v2 are [B, H, Tk, D] with Tq <= Tk. The queries are the
*last* Tq positions of the key sequence, so query i sits at absolute position t = Tk - Tq + i (prefill
continuation and decode). Query t may use the pair (a, b) when

    a <= t and b <= t                       (causal over pairs)
    t - a < w1 (if w1) and t - b < w2 (if w2)   (Roy et al. 2025 windows)
    attention_mask[a] and attention_mask[b]     (both tokens real)

A query with no allowed pair returns zeros.
"""

from __future__ import annotations

import torch


def check_inputs(q, k1, k2, v1, v2, *, scale, w1=None, w2=None, attention_mask=None) -> None:
    """Raise ValueError naming the offending argument when the inputs do not follow the op conventions."""
    named = {"q": q, "k1": k1, "k2": k2, "v1": v1, "v2": v2}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"`{name}` must be a torch.Tensor of shape [B, H, T, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"`{name}` must have 4 dimensions [B, H, T, D], got shape {tuple(t.shape)}")
    B, H, Tq, D = q.shape
    Tk = k1.shape[2]
    for name in ("k1", "k2", "v1", "v2"):
        t = named[name]
        if tuple(t.shape) != (B, H, Tk, D):
            raise ValueError(
                f"`{name}` has shape {tuple(t.shape)}; expected {(B, H, Tk, D)} to match `q` {tuple(q.shape)} and `k1`"
            )
        if t.dtype != q.dtype:
            raise ValueError(f"`{name}` has dtype {t.dtype}; all inputs must share q's dtype {q.dtype}")
    if Tq > Tk:
        raise ValueError(f"`q` has {Tq} positions but the keys only {Tk}; queries must be the last Tq <= Tk positions")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"`scale` must be a float, got {scale!r}")
    for name, w in (("w1", w1), ("w2", w2)):
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"`{name}` must be None (no window) or an int >= 1, got {w!r}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, Tk):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"`attention_mask` must be a [B, Tk] = {(B, Tk)} tensor of 0/1 or bool, got {shape}")


def allowed_positions(Tq: int, Tk: int, window: int | None, device) -> torch.Tensor:
    """[Tq, Tk] bool: key position a is visible to query i (causal, and inside the window if any)."""
    t = torch.arange(Tk - Tq, Tk, device=device)[:, None]  # absolute query positions
    a = torch.arange(Tk, device=device)[None, :]
    ok = a <= t
    if window is not None:
        ok = ok & (t - a < window)
    return ok


def allowed_pairs(Tq: int, Tk: int, w1, w2, attention_mask, device) -> torch.Tensor:
    """[B or 1, 1, Tq, Tk, Tk] bool mask of the pairs (a, b) each query may use."""
    ok1 = allowed_positions(Tq, Tk, w1, device)  # [Tq, Tk] over a
    ok2 = allowed_positions(Tq, Tk, w2, device)  # [Tq, Tk] over b
    pairs = (ok1[:, :, None] & ok2[:, None, :])[None, None]  # [1, 1, Tq, Tk, Tk]
    if attention_mask is not None:
        real = attention_mask.to(device=device, dtype=torch.bool)  # [B, Tk]
        pairs = pairs & (real[:, None, None, :, None] & real[:, None, None, None, :])
    return pairs
