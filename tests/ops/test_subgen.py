"""SubGen's stateless numerics (`ops.subgen`) against their references: the factorized estimator against the
explicit Kronecker rows, batched clustering against one row at a time."""

import pytest
import torch

from hf_tensor_attn.ops.subgen.clustering import assign_clusters, nearest_cluster_pair
from hf_tensor_attn.ops import extension
from hf_tensor_attn.ops.subgen.estimators import log_weights, weighted_pair_attention, weighted_pair_sums
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


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("R1, R2, threads", [(5, 5, 1), (37, 600, 2), (130, 9, 1)])
def test_weighted_pair_attention_compiled_matches_its_reference(R1, R2, threads, dtype, tol):
    """The compiled step (`decode_step` with log-weights as row and column biases) against its reference, `combine`
    of `weighted_pair_sums`: streams of different lengths (the shorter padded), more columns than one tile (512),
    three query heads per key/value head, an odd head width, absent rows, a head with no row at all (zeros), on one
    thread and on two (tiles on other threads)."""
    loops = extension.cpu_ops()
    if loops is None:
        pytest.skip("the compiled CPU loops could not be built here (see its RuntimeWarning)")
    g = torch.Generator().manual_seed(R1 + R2)
    B, H_kv, G, D = 2, 2, 3, 17

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    q = rand(B, H_kv * G, 1, D)
    k1, v1, k2, v2 = rand(B, H_kv, R1, D), rand(B, H_kv, R1, D), rand(B, H_kv, R2, D), rand(B, H_kv, R2, D)
    counts1 = torch.randint(1, 50, (B, H_kv, R1), generator=g).to(dtype) * (torch.rand(B, H_kv, R1, generator=g) > 0.25)
    counts2 = torch.randint(1, 50, (B, H_kv, R2), generator=g).to(dtype) * (torch.rand(B, H_kv, R2, generator=g) > 0.25)
    counts1[1, 0] = 0  # no first-stream row in this head: its query heads see no pair
    lw1, lw2 = log_weights(counts1), log_weights(counts2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = weighted_pair_attention(q, k1, lw1, k2, lw2, scale=0.3, v1=v1, v2=v2, loops=loops)
    finally:
        torch.set_num_threads(before)
    ref = weighted_pair_attention(q, k1, lw1, k2, lw2, scale=0.3, v1=v1, v2=v2)
    assert fast.shape == ref.shape == (B, H_kv * G, 1, D) and fast.dtype == dtype
    torch.testing.assert_close(fast, ref, rtol=tol, atol=tol)
    assert torch.equal(fast[1, :G], torch.zeros_like(fast[1, :G]))


def test_weighted_pair_attention_reference_is_the_normalised_kronecker_sum():
    B, H, R1, R2, D = 1, 2, 6, 4, 5
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, 1, D, generator=g, dtype=torch.float64)
    k1, v1 = torch.randn(B, H, R1, D, generator=g, dtype=torch.float64), torch.randn(B, H, R1, D, generator=g, dtype=torch.float64)
    k2, v2 = torch.randn(B, H, R2, D, generator=g, dtype=torch.float64), torch.randn(B, H, R2, D, generator=g, dtype=torch.float64)
    lw1, lw2 = torch.randn(B, H, R1, generator=g, dtype=torch.float64), torch.randn(B, H, R2, generator=g, dtype=torch.float64)
    lw1[0, 1, 2] = float("-inf")
    num, den, _ = naive_weighted_pair_sums(q, k1, lw1[:, :, None], k2, lw2[:, :, None], scale=0.5, v1=v1, v2=v2)
    out = weighted_pair_attention(q, k1, lw1, k2, lw2, scale=0.5, v1=v1, v2=v2)
    torch.testing.assert_close(out, num / den[..., None], rtol=1e-12, atol=1e-12)


def test_weighted_pair_attention_through_the_door_keeps_its_gradient():
    """The compiled step has no gradient: a call that needs one runs the torch ops, whose gradients equal those of
    the normalised Kronecker sum."""
    from hf_tensor_attn.ops import dispatch

    g = torch.Generator().manual_seed(2)
    B, H, R1, R2, D = 1, 2, 5, 4, 3
    q = torch.randn(B, H, 1, D, generator=g, dtype=torch.float64, requires_grad=True)
    k1, v1 = torch.randn(B, H, R1, D, generator=g, dtype=torch.float64), torch.randn(B, H, R1, D, generator=g, dtype=torch.float64)
    k2, v2 = torch.randn(B, H, R2, D, generator=g, dtype=torch.float64), torch.randn(B, H, R2, D, generator=g, dtype=torch.float64)
    lw1, lw2 = torch.randn(B, H, R1, generator=g, dtype=torch.float64), torch.randn(B, H, R2, generator=g, dtype=torch.float64)
    out = dispatch.weighted_pair_attention(q, k1, lw1, k2, lw2, scale=0.5, v1=v1, v2=v2)
    (grad,) = torch.autograd.grad(out.sum(), q)
    num, den, _ = naive_weighted_pair_sums(q, k1, lw1[:, :, None], k2, lw2[:, :, None], scale=0.5, v1=v1, v2=v2)
    (ref,) = torch.autograd.grad((num / den[..., None]).sum(), q)
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12)


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
