"""Stateless numerics of SubGen eviction for tensor attention (Zandieh et al. 2024, adapted to pairs), each with its plain reference:

- the estimators: `weighted_pair_sums` (the factorized product over two weighted streams; reference
  `naive_weighted_pair_sums`, which forms the Kronecker rows k1_a ⊙ k2_b explicitly), `weighted_row_sums` (over
  plain rows, the two-cache layout's form) and `combine` (Ô = Σ N / Σ Z over partial sums);
- online δ-clustering of a batch of rows, `assign_clusters` (reference `naive_assign_clusters`, one row at a time).

The state these read and write (clusters, reservoirs, samplers) is `cache.summary.StreamSummary`.
"""

from __future__ import annotations

import torch

from .common import finite_or_zero

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


def naive_weighted_pair_sums(q, k1, lw1, k2, lw2, *, scale, v1=None, v2=None):
    """Reference for `weighted_pair_sums`: builds the R1·R2 Kronecker rows (the two-cache layout) and sums them."""
    B, H, R1, D = k1.shape
    R2 = k2.shape[2]
    rows_k = (k1[:, :, :, None] * k2[:, :, None]).reshape(B, H, R1 * R2, D)
    rows_lw = (lw1[..., :, None] + lw2[..., None, :]).reshape(*lw1.shape[:-1], R1 * R2)
    rows_v = None if v1 is None else (v1[:, :, :, None] * v2[:, :, None]).reshape(B, H, R1 * R2, D)
    return weighted_row_sums(q, rows_k, rows_lw, scale=scale, v=rows_v)


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


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[..., R, D] x [..., C, D] -> [..., R, C] squared l2 distances."""
    d2 = (x * x).sum(-1)[..., :, None] + (c * c).sum(-1)[..., None, :] - 2 * torch.matmul(x, c.transpose(-1, -2))
    return d2.clamp_min(0)


def assign_clusters(x, valid, centers, n_clusters, delta):
    """Leader clustering of a batch of rows, exactly as if the rows arrived one by one.

    A row joins the first cluster (in creation order) whose center is within `delta`, else opens a new cluster
    centred on itself. `delta` is a float or a per-head radius [B, H] (the budgeted summary grows it head by head).
    x [B, H, R, D]; valid [B, H, R] (absent rows join nothing); centers [B, H, C, D] with the
    first n_clusters [B, H] in use. Returns (assign [B, H, R] long, -1 for absent rows; new_centers [B, H, R, D];
    new_count [B, H]) where the opened clusters take indices n_clusters, n_clusters + 1, ... and
    new_centers[:, :, j] is the center of the j-th opened one.
    The loop runs once per opened cluster (the most any head opens), not once per row.
    """
    B, H, R, D = x.shape
    radius = torch.as_tensor(delta, dtype=x.dtype, device=x.device).expand(B, H)
    d2sq = (radius * radius)[..., None]  # [B, H, 1]
    C = centers.shape[2]
    if C:
        in_use = torch.arange(C, device=x.device) < n_clusters[..., None]  # [B, H, C]
        near = (_sq_dist(x, centers) <= d2sq[..., None]) & in_use[:, :, None, :]  # [B, H, R, C]
        matched = near.any(-1) & valid
        assign = torch.where(matched, near.int().argmax(-1), -1)
    else:
        matched = torch.zeros(B, H, R, dtype=torch.bool, device=x.device)
        assign = torch.full((B, H, R), -1, dtype=torch.long, device=x.device)
    pending = valid & ~matched
    new_centers = x.new_zeros(B, H, R, D)
    opened = torch.zeros(B, H, dtype=torch.long, device=x.device)
    rows = torch.arange(R, device=x.device)
    while bool(pending.any()):
        active = pending.any(-1)  # [B, H]
        leader = pending.int().argmax(-1)  # [B, H] first pending row
        center = x.gather(2, leader[..., None, None].expand(B, H, 1, D))  # [B, H, 1, D]
        join = pending & ((x - center).pow(2).sum(-1) <= d2sq)
        join |= pending & (rows == leader[..., None])  # the leader itself, whatever rounding says
        join &= active[..., None]
        assign = torch.where(join, (n_clusters + opened)[..., None], assign)
        slot = opened.clamp_max(R - 1)[..., None, None].expand(B, H, 1, D)
        new_centers.scatter_(2, slot, torch.where(active[..., None, None], center, new_centers.gather(2, slot)))
        opened += active.long()
        pending &= ~join
    return assign, new_centers, opened


def nearest_cluster_pair(centers, n_clusters):
    """The closest pair of clusters in use, per head: what a capped summary merges.

    centers [B, H, C, D] with the first n_clusters [B, H] in use. Returns (i, j, dist2), each [B, H]: i < j the
    pair with the smallest squared l2 distance (the first such pair in row-major order on ties), dist2 = inf where
    a head has fewer than two clusters.
    """
    B, H, C, _ = centers.shape
    d2 = _sq_dist(centers, centers)  # [B, H, C, C]
    idx = torch.arange(C, device=centers.device)
    in_use = idx < n_clusters[..., None]  # [B, H, C]
    pair_ok = (idx[:, None] < idx[None, :]) & in_use[..., :, None] & in_use[..., None, :]  # [B, H, C, C]: i < j
    d2 = torch.where(pair_ok, d2, float("inf")).reshape(B, H, C * C)
    dist2, flat = d2.min(-1)
    return flat // C, flat % C, dist2


def naive_nearest_cluster_pair(centers, n_clusters):
    """Plain double loop with the semantics of `nearest_cluster_pair` (its oracle in the tests)."""
    B, H, C, _ = centers.shape
    i_out = torch.zeros(B, H, dtype=torch.long)
    j_out = torch.zeros(B, H, dtype=torch.long)
    d_out = torch.full((B, H), float("inf"), dtype=centers.dtype)
    for b in range(B):
        for h in range(H):
            n = int(n_clusters[b, h])
            for i in range(n):
                for j in range(i + 1, n):
                    d = float((centers[b, h, i] - centers[b, h, j]).pow(2).sum())
                    if d < d_out[b, h]:
                        i_out[b, h], j_out[b, h], d_out[b, h] = i, j, d
    return i_out, j_out, d_out


def naive_assign_clusters(x, valid, centers, n_clusters, delta):
    """Plain per-row loop with the semantics of `assign_clusters` (its oracle in the tests)."""
    B, H, R, D = x.shape
    radius = torch.as_tensor(delta, dtype=torch.float64).expand(B, H)
    assign = torch.full((B, H, R), -1, dtype=torch.long)
    for b in range(B):
        for h in range(H):
            delta = float(radius[b, h])
            cs = [centers[b, h, c] for c in range(int(n_clusters[b, h]))]
            for r in range(R):
                if not valid[b, h, r]:
                    continue
                for c, center in enumerate(cs):
                    if float((x[b, h, r] - center).pow(2).sum()) <= delta * delta:
                        assign[b, h, r] = c
                        break
                else:
                    assign[b, h, r] = len(cs)
                    cs.append(x[b, h, r])
    return assign


__all__ = [
    "NUMERATORS",
    "assign_clusters",
    "combine",
    "log_weights",
    "naive_weighted_pair_sums",
    "naive_assign_clusters",
    "naive_nearest_cluster_pair",
    "nearest_cluster_pair",
    "weighted_pair_sums",
    "weighted_row_sums",
]
