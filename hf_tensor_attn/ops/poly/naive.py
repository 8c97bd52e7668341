"""The reference of polynomial tensor attention: P evaluated on the explicit Tq x Tk x Tk scores, the oracle of the
feature path (`chunk`)."""

from __future__ import annotations

import torch

from .common import _check_inputs, _compute_dtype, _floor, _normalise, drop_padded, key_mask, polynomial_coefficients


def denominator_floor(q, k1, k2, real, *, scale: float, causal: bool) -> torch.Tensor:
    """The floor of every query from the whole key sequence at once (the oracle's way; `real` [B, 1, Tk, 1])."""
    Tq, Tk = q.shape[2], k1.shape[2]
    if causal:
        m1 = torch.cummax(k1.abs() * real, dim=2).values[:, :, Tk - Tq :]  # [B, H, Tq, Dk] max over a <= t
        m2 = torch.cummax(k2.abs() * real, dim=2).values[:, :, Tk - Tq :]
        n = torch.cumsum(real[..., 0], dim=2)[:, :, Tk - Tq :]  # [B, 1, Tq]
    else:
        m1, m2 = (k1.abs() * real).amax(dim=2, keepdim=True), (k2.abs() * real).amax(dim=2, keepdim=True)
        n = real[..., 0].sum(dim=2, keepdim=True)
    return _floor(q, m1, m2, n, scale)


def naive_poly_tensor_attention(
    q, k1, k2, v1, v2, *, scale, degree, attention_mask=None, causal=True, score_bound=None, chunk_size=None
):
    """The oracle: P evaluated on all Tq x Tk x Tk explicit scores (Horner), masked sums, the same floor.

    Computes in float64 for float64 inputs and float32 otherwise; returns q's dtype. `chunk_size` is accepted for
    the shared signature and unused."""
    _check_inputs(q, k1, k2, v1, v2, scale=scale, degree=degree, attention_mask=attention_mask, causal=causal,
                  score_bound=score_bound, chunk_size=chunk_size)
    B, H, Tq, _ = q.shape
    Tk = k1.shape[2]
    dtype = q.dtype
    if Tq == 0:  # no query (and perhaps no key): the floor below would reduce over an empty dimension
        return q.new_zeros(B, H, 0, v1.shape[-1])
    q, k1, k2, v1, v2 = (t.to(_compute_dtype(dtype)) for t in (q, k1, k2, v1, v2))
    real = key_mask(attention_mask, B, Tk, q.dtype, q.device)
    k1, k2, v1, v2 = drop_padded(real, k1, k2, v1, v2)
    scores = torch.einsum("bhtd,bhad,bhcd->bhtac", q, k1, k2) * scale  # [B, H, Tq, Tk, Tk]
    P = torch.zeros_like(scores)
    for c in reversed(polynomial_coefficients(degree, score_bound)):
        P = P * scores + c
    allowed = real[:, :, None, :, 0, None] * real[:, :, None, None, :, 0]  # [B, 1, 1, Tk, Tk]
    if causal:
        t = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
        seen = (torch.arange(Tk, device=q.device)[None, :] <= t).to(q.dtype)  # [Tq, Tk]
        allowed = allowed * seen[:, :, None] * seen[:, None, :]  # [B, 1, Tq, Tk, Tk]
        # Each query multiplies in only the values it may use: a NaN in a later one would survive a zero weight.
        v1, v2 = (torch.where(seen[:, :, None] > 0, v[:, :, None], 0) for v in (v1, v2))  # [B, H, Tq, Tk, Dv]
    else:
        v1, v2 = v1[:, :, None], v2[:, :, None]  # [B, H, 1, Tk, Dv]
    P = torch.where(allowed > 0, P, 0)  # not P * allowed: the score of a pair with a later NaN key is NaN
    num = torch.einsum("bhtac,bhtad,bhtcd->bhtd", P, v1.expand(-1, -1, Tq, -1, -1), v2.expand(-1, -1, Tq, -1, -1))
    den = P.sum(dim=(-1, -2))
    floor = denominator_floor(q, k1, k2, real, scale=float(scale), causal=causal)
    return _normalise(num, den, floor).to(dtype)

