"""SubGen's stateless numerics (`ops.subgen`) against their references: the factorized estimator against the
explicit Kronecker rows, batched clustering against one row at a time."""

import pytest
import torch

from hf_tensor_attn.ops.subgen.clustering import assign_clusters, nearest_cluster_pair
from hf_tensor_attn.ops.subgen.estimators import log_weights, weighted_pair_sums
from hf_tensor_attn.ops.subgen.naive import naive_assign_clusters, naive_nearest_cluster_pair, naive_weighted_pair_sums


def test_weighted_pair_sums_match_kronecker_reference():
    B, H, Tq, R1, R2, D = 2, 3, 2, 7, 5, 6
    q = torch.randn(B, H, Tq, D, dtype=torch.float64)
    k1, v1 = torch.randn(B, H, R1, D, dtype=torch.float64), torch.randn(B, H, R1, D, dtype=torch.float64)
    k2, v2 = torch.randn(B, H, R2, D, dtype=torch.float64), torch.randn(B, H, R2, D, dtype=torch.float64)
    w1 = torch.rand(B, H, Tq, R1, dtype=torch.float64) * (torch.rand(B, H, Tq, R1) > 0.3)
    w2 = torch.rand(B, H, 1, R2, dtype=torch.float64) * 3
    w1[0, 0, 0] = 0  # a query that sees no pair gives zeros, not NaN
    fast = weighted_pair_sums(q, k1, log_weights(w1), k2, log_weights(w2), scale=0.7, v1=v1, v2=v2)
    ref = naive_weighted_pair_sums(q, k1, log_weights(w1), k2, log_weights(w2), scale=0.7, v1=v1, v2=v2)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert fast[1][0, 0, 0] == 0 and torch.isfinite(fast[0]).all()


@pytest.mark.parametrize("delta", [0.0, 0.8, 1.5])
def test_batched_clustering_equals_one_row_at_a_time(delta):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 60, 4, generator=g, dtype=torch.float64)
    x[:, :, 30:] = x[:, :, :30]  # repeated keys: delta=0 must put them in the existing clusters
    valid = torch.rand(2, 3, 60, generator=g) > 0.2
    centers = torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64)
    n_clusters = torch.tensor([[0, 2, 6], [1, 3, 4]])
    assign, _, opened = assign_clusters(x, valid, centers, n_clusters, delta)
    assert torch.equal(assign, naive_assign_clusters(x, valid, centers, n_clusters, delta))
    new_ids = [[len(set(assign[b, h][assign[b, h] >= n_clusters[b, h]].tolist())) for h in range(3)] for b in range(2)]
    assert opened.tolist() == new_ids


def test_per_head_radius_clustering_equals_one_row_at_a_time():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 40, 4, generator=g, dtype=torch.float64)
    valid = torch.rand(2, 3, 40, generator=g) > 0.2
    centers = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    n_clusters = torch.tensor([[0, 2, 5], [1, 3, 4]])
    radius = torch.tensor([[0.0, 1.0, 2.5], [0.5, 1.8, 3.0]], dtype=torch.float64)
    assign, _, _ = assign_clusters(x, valid, centers, n_clusters, radius)
    assert torch.equal(assign, naive_assign_clusters(x, valid, centers, n_clusters, radius))


def test_nearest_cluster_pair_matches_reference():
    g = torch.Generator().manual_seed(5)
    centers = torch.randn(2, 3, 9, 5, generator=g, dtype=torch.float64)
    n_clusters = torch.tensor([[9, 2, 0], [1, 6, 7]])  # fewer than two clusters: no pair, distance inf
    i, j, dist2 = nearest_cluster_pair(centers, n_clusters)
    ri, rj, rdist2 = naive_nearest_cluster_pair(centers, n_clusters)
    assert torch.equal(i, ri) and torch.equal(j, rj)
    torch.testing.assert_close(dist2, rdist2, rtol=1e-12, atol=1e-12)
    assert bool((i < j)[n_clusters >= 2].all()) and bool(torch.isinf(dist2[n_clusters < 2]).all())
