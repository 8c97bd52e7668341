"""The references of SubGen's numerics (their oracles in the tests): the pair estimator through explicit Kronecker
rows, and the clustering one row at a time in plain loops."""

from __future__ import annotations

import torch

from .estimators import weighted_row_sums


def naive_weighted_pair_sums(q, k1, lw1, k2, lw2, *, scale, v1=None, v2=None):
    """Reference for `weighted_pair_sums`: builds the R1·R2 Kronecker rows (the two-cache layout) and sums them."""
    B, H, R1, D = k1.shape
    R2 = k2.shape[2]
    rows_k = (k1[:, :, :, None] * k2[:, :, None]).reshape(B, H, R1 * R2, D)
    rows_lw = (lw1[..., :, None] + lw2[..., None, :]).reshape(*lw1.shape[:-1], R1 * R2)
    rows_v = None if v1 is None else (v1[:, :, :, None] * v2[:, :, None]).reshape(B, H, R1 * R2, D)
    return weighted_row_sums(q, rows_k, rows_lw, scale=scale, v=rows_v)


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


__all__ = ["naive_assign_clusters", "naive_nearest_cluster_pair", "naive_weighted_pair_sums"]
