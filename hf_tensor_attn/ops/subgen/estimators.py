"""SubGen's estimators for tensor attention: `weighted_pair_sums` (the factorized product over two weighted streams;
reference `naive.naive_weighted_pair_sums`, which forms the Kronecker rows k1_a ⊙ k2_b explicitly),
`weighted_row_sums` (over plain rows, the two-cache layout's form), `combine` (Ô = Σ N / Σ Z over partial sums) and
`weighted_pair_attention`, the normalised output of one query over two weighted streams (a `subgen4` decode step),
whose reference is `combine` of `weighted_pair_sums`.
"""

from __future__ import annotations

import torch

from ..common import EXP_FLOOR, finite_or_zero, fold_groups, unfold_groups

NUMERATORS = ("cluster_sum", "sampled")


def log_weights(weights: torch.Tensor) -> torch.Tensor:
    """log of non-negative weights, -inf where a row is absent (weight 0)."""
    return torch.where(weights > 0, weights.clamp_min(torch.finfo(weights.dtype).tiny).log(), float("-inf"))


def _safe_max(logits: torch.Tensor, dims) -> torch.Tensor:
    if logits.numel() == 0:  # no rows at all (an empty summary)
        return logits.sum(dim=dims)
    return finite_or_zero(logits.amax(dim=dims))


def weighted_pair_sums(q, k1, lw1, k2, lw2, *, scale, v1=None, v2=None):
    """Σ_(a,b) exp(lw1_a + lw2_b + scale·<q, k1_a ⊙ k2_b> − shift) · (v1_a ⊙ v2_b), through the factorized product.

    q [B, H, Tq, D]; k1, v1 [B, H, R1, D]; lw1 [B, H, Tq or 1, R1] log-weights (-inf: row absent or invisible to that
    query); likewise stream 2. Returns (num [B, H, Tq, D] or None without values, den [B, H, Tq], shift [B, H, Tq]).
    Never forms the R1·R2 x D Kronecker rows: about 4·R1·R2·D flops per query.
    """
    scores = torch.matmul((k1[:, :, None] * (q * scale)[:, :, :, None]), k2[:, :, None].transpose(-1, -2))
    logits = scores + lw1[..., :, None] + lw2[..., None, :]  # [B, H, Tq, R1, R2]
    shift = _safe_max(logits, (-1, -2))
    probs = torch.exp(logits - shift[..., None, None])
    den = probs.sum((-1, -2))
    num = None
    if v1 is not None:
        num = (v1[:, :, None] * torch.matmul(probs, v2[:, :, None])).sum(-2)  # [B, H, Tq, D]
    return num, den, shift


def weighted_row_sums(q, k, lw, *, scale, v=None):
    """Σ_r exp(lw_r + scale·<q, k_r> − shift) · v_r for plain rows (the two-cache layout's estimator).

    q [B, H, Tq, D]; k, v [B, H, R, D]; lw [B, H, Tq or 1, R]. Returns (num or None, den, shift) as above.
    """
    logits = torch.matmul(q * scale, k.transpose(-1, -2)) + lw  # [B, H, Tq, R]
    shift = _safe_max(logits, -1)
    probs = torch.exp(logits - shift[..., None])
    num = None if v is None else torch.matmul(probs, v)
    return num, probs.sum(-1), shift


def combine(parts_num, parts_den) -> torch.Tensor:
    """Ô = Σ num / Σ den over partial sums given as (num, den, shift) triples; zeros where nothing is visible."""
    shifts = [p[2] for p in parts_num + parts_den]
    top = torch.stack(shifts).amax(0)  # [B, H, Tq]
    num = sum(p[0] * torch.exp(p[2] - top)[..., None] for p in parts_num)
    den = sum(p[1] * torch.exp(p[2] - top) for p in parts_den)
    return num / torch.where(den > 0, den, torch.ones_like(den))[..., None]


def weighted_pair_attention(q, k1, lw1, k2, lw2, *, scale, v1, v2, loops=None):
    """Ô = Σ_(a,b) exp(lw1_a + lw2_b + scale·<q, k1_a ⊙ k2_b>) (v1_a ⊙ v2_b) / Σ_(a,b) exp(...) for one query position.

    q [B, H, 1, D]; k1, v1 [B, H_kv, R1, D] and lw1 [B, H_kv, R1] (log-weights, -inf: row absent), likewise stream 2,
    with H_kv dividing H (the G query heads of a group read their key/value head's rows). Zeros where no pair is
    present. `loops`: the compiled CPU library, whose `decode_step` runs it in one call (the log-weights as row and
    column biases of the four-matrix step, the shorter stream padded with absent rows), or None for the torch ops:
    `combine` of `weighted_pair_sums`, which is its reference. Rows and q must share a floating dtype.
    """
    B, H, _, D = q.shape
    H_kv = k1.shape[1]
    if loops is None:
        part = weighted_pair_sums(fold_groups(q, H_kv), k1, lw1[:, :, None], k2, lw2[:, :, None], scale=scale, v1=v1,
                                  v2=v2)
        return unfold_groups(combine([part], [part]), H)
    R = max(k1.shape[2], k2.shape[2], 1)

    def padded(k, v, lw):
        """The stream as [B, H_kv, R, D] rows and [B, H_kv, R] log-weights, absent rows (-inf) past its own."""
        missing = R - k.shape[2]
        if missing == 0:
            return k, v, lw.contiguous()
        zeros = k.new_zeros(B, H_kv, missing, D)
        return (torch.cat([k, zeros], 2), torch.cat([v, zeros], 2),
                torch.cat([lw, lw.new_full((B, H_kv, missing), float("-inf"))], 2))

    (k1, v1, lw1), (k2, v2, lw2) = padded(k1, v1, lw1), padded(k2, v2, lw2)
    empty = torch.empty(0, dtype=torch.bool)
    return loops.decode_step(q.contiguous(), k1, k2, v1, v2, empty, lw1, lw2, 0, 0, float(scale), EXP_FLOOR[q.dtype])


__all__ = ["NUMERATORS", "combine", "log_weights", "weighted_pair_attention", "weighted_pair_sums",
           "weighted_row_sums"]
