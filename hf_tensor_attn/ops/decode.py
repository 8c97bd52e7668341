"""One-query decode against the four cache matrices (paper Def. 3.7), as GEMM-shaped products.

For a query q and cached K1, K2, V1, V2 (i x d each):

    S = scale * (K1 * q) @ K2^T        # [i, i] scores, one (i x d) @ (d x i) product
    P = softmax(S) over allowed pairs  # all i^2 entries jointly
    o = sum_a v1_a * (P @ V2)_a        # (i x i) @ (i x d), then a weighted row sum

About 4 i^2 d flops and O(i^2) scratch; the i^2 x d Kronecker matrix K1 ⊘ K2 is never formed.
"""

from __future__ import annotations

import torch

from .common import check_inputs


def four_cache_decode(q, k1, k2, v1, v2, *, scale, w1=None, w2=None, attention_mask=None):
    """Tensor attention of the last position (q is [B, H, 1, D]) over cached [B, H, Tk, D] streams.

    Same signature and result as `naive_tensor_attention` with Tq = 1.
    """
    check_inputs(q, k1, k2, v1, v2, scale=scale, w1=w1, w2=w2, attention_mask=attention_mask)
    if q.shape[2] != 1:
        raise ValueError(f"`q` must hold one decode position, got shape {tuple(q.shape)}")
    Tk = k1.shape[2]
    # The windows only keep the last w1 (w2) positions of each stream: slice instead of masking.
    n1 = Tk if w1 is None else min(w1, Tk)
    n2 = Tk if w2 is None else min(w2, Tk)
    k1, v1 = k1[:, :, Tk - n1 :], v1[:, :, Tk - n1 :]  # [B, H, n1, D]
    k2, v2 = k2[:, :, Tk - n2 :], v2[:, :, Tk - n2 :]  # [B, H, n2, D]
    dtype = q.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k1, k2, v1, v2 = (t.to(compute) for t in (q, k1, k2, v1, v2))

    scores = torch.matmul(k1 * (q * scale), k2.transpose(-1, -2))  # [B, H, n1, n2]
    if attention_mask is not None:
        real = attention_mask.to(device=q.device, dtype=torch.bool)
        ok = real[:, None, Tk - n1 :, None] & real[:, None, None, Tk - n2 :]  # [B, 1, n1, n2]
        scores = scores.masked_fill(~ok, float("-inf"))
    B, H = scores.shape[:2]
    flat = scores.reshape(B, H, n1 * n2)
    row_max = flat.amax(-1, keepdim=True)
    # No allowed pair (a pad query): max is -inf; use 0 so exp gives 0 and the output is 0, not NaN.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(flat - row_max)
    denom = probs.sum(-1, keepdim=True)
    probs = (probs / torch.where(denom > 0, denom, torch.ones_like(denom))).reshape(B, H, n1, n2)
    out = (v1 * torch.matmul(probs, v2)).sum(-2, keepdim=True)  # [B, H, 1, D]
    return out.to(dtype)
