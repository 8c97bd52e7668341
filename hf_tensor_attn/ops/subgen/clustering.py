"""Online δ-clustering of SubGen's summary rows: `assign_clusters` for a batch of rows (reference
`naive.naive_assign_clusters`, one row at a time) and `nearest_cluster_pair`, what a capped summary merges
(reference `naive.naive_nearest_cluster_pair`)."""

from __future__ import annotations

import torch


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


__all__ = ["assign_clusters", "nearest_cluster_pair"]
