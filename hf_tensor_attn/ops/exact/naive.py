"""The reference tensor attention: materialises all Tq x Tk x Tk scores. Slow and memory-hungry on purpose;
it is the oracle every fast path is tested against."""

from __future__ import annotations

import torch

from ..common import allowed_pairs, allowed_positions, check_inputs, masked_softmax, repeat_kv


def naive_tensor_attention(q, k1, k2, v1, v2, *, scale, w1=None, w2=None, attention_mask=None):
    """o_t = sum_(a,b) softmax_(a,b)(scale * <q_t, k1_a * k2_b>) * (v1_a * v2_b); see `ops.common` for masking.

    Computes in float64 for float64 inputs and in float32 otherwise; returns q's dtype. Grouped key/value heads are
    repeated explicitly for their query heads.
    """
    check_inputs(q, k1, k2, v1, v2, scale=scale, w1=w1, w2=w2, attention_mask=attention_mask)
    if q.shape[2] == 0:  # no query (and perhaps no key): the softmax below would reduce over an empty dimension
        return q.new_zeros(*q.shape[:2], 0, v1.shape[-1])
    dtype = q.dtype
    probs = naive_pair_weights(q, k1, k2, scale=scale, w1=w1, w2=w2, attention_mask=attention_mask)
    H, Tq = q.shape[1], q.shape[2]
    v1, v2 = (repeat_kv(t, H // t.shape[1]).to(probs.dtype) for t in (v1, v2))
    # Each query sees only the values it may use: a pair it may not use weighs 0, but 0 * NaN would still be NaN.
    v1, v2 = (_visible(v, Tq, w, attention_mask) for v, w in ((v1, w1), (v2, w2)))  # [B, H, Tq, Tk, D] each
    out = torch.einsum("bhtac,bhtad,bhtcd->bhtd", probs, v1, v2)
    return out.to(dtype)


def naive_pair_weights(q, k1, k2, *, scale, w1=None, w2=None, attention_mask=None):
    """P_t(a, b) [B, H, Tq, Tk, Tk]: each query's softmax over the pairs it may use (zeros elsewhere), in float64
    for float64 inputs and float32 otherwise. Queries are the last Tq positions; grouped heads are repeated."""
    B, H, Tq, D = q.shape
    k1, k2 = (repeat_kv(t, H // t.shape[1]) for t in (k1, k2))
    Tk = k1.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k1, k2 = (t.to(compute) for t in (q, k1, k2))
    scores = torch.einsum("bhtd,bhad,bhcd->bhtac", q, k1, k2) * scale  # [B, H, Tq, Tk, Tk]
    allowed = allowed_pairs(Tq, Tk, w1, w2, attention_mask, q.device)  # [B or 1, 1, Tq, Tk, Tk]
    # One softmax over all pairs of a query, not row by row.
    probs = masked_softmax(scores.reshape(B, H, Tq, Tk * Tk), allowed.reshape(allowed.shape[0], 1, Tq, Tk * Tk))
    return probs.reshape(B, H, Tq, Tk, Tk)


def naive_tensor_attention_with_weights(q, k1, k2, v1, v2, *, scale, w1=None, w2=None, attention_mask=None):
    """(o [B, H, Tq, D], P [B, H, Tq, Tk]): `naive_tensor_attention`'s output and, per query, its pair weights
    marginalised over the second key, P_t(a) = sum_b P_t(a, b) (each row a distribution over a; zeros for a query
    with no allowed pair). o is computed through P, as the same sum regrouped:
    o_t = sum_a P_t(a) v1_a * (sum_b P_t(b | a) v2_b), with P_t(b | a) = P_t(a, b) / P_t(a), so gradients reach the
    weights returned as they reach softmax attention's. Dtypes as in `naive_tensor_attention`."""
    check_inputs(q, k1, k2, v1, v2, scale=scale, w1=w1, w2=w2, attention_mask=attention_mask)
    dtype = q.dtype
    probs = naive_pair_weights(q, k1, k2, scale=scale, w1=w1, w2=w2, attention_mask=attention_mask)
    marginal = probs.sum(-1)  # [B, H, Tq, Tk]
    # P_t(a) = 0 only where every P_t(a, b) is 0: divide by 1 there, so no 0/0 (nor its NaN gradient) appears.
    conditional = probs / torch.where(marginal > 0, marginal, torch.ones_like(marginal))[..., None]
    H, Tq = q.shape[1], q.shape[2]
    v1, v2 = (repeat_kv(t, H // t.shape[1]).to(probs.dtype) for t in (v1, v2))
    v1, v2 = (_visible(v, Tq, w, attention_mask) for v, w in ((v1, w1), (v2, w2)))  # [B, H, Tq, Tk, D] each
    inner = torch.einsum("bhtac,bhtcd->bhtad", conditional, v2)  # [B, H, Tq, Tk, D]: sum_b P_t(b | a) v2_b
    out = torch.einsum("bhta,bhtad,bhtad->bhtd", marginal, v1, inner)
    return out.to(dtype), marginal.to(dtype)


def _visible(v, Tq, window, attention_mask):
    """[B, H, Tq, Tk, D]: per query, the values of the positions it may use, zeros elsewhere."""
    ok = allowed_positions(Tq, v.shape[2], window, v.device)[None]  # [1, Tq, Tk]
    if attention_mask is not None:
        ok = ok & attention_mask.to(device=v.device, dtype=torch.bool)[:, None, :]  # [B, Tq, Tk]
    return torch.where(ok[:, None, :, :, None], v[:, :, None], 0)
