"""Polynomial tensor attention: the feature path against the explicit-polynomial oracle (outputs and gradients),
the polynomial choices, the denominator floor and the argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from hf_tensor_attn.ops import naive_poly_tensor_attention, poly_tensor_attention, tensor_attention
from hf_tensor_attn.ops.poly.common import num_features, polynomial_coefficients
from hf_tensor_attn.ops.poly.features import key_features, query_features

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_inputs(B, H, Tq, Tk, D, Dv, dtype=torch.float64, *, seed=0, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64) * magnitude
    k1, k2 = (torch.randn(B, H, Tk, D, generator=g, dtype=torch.float64) * magnitude for _ in range(2))
    v1, v2 = (torch.randn(B, H, Tk, Dv, generator=g, dtype=torch.float64) for _ in range(2))
    return [t.to(dtype) for t in (q, k1, k2, v1, v2)]


def padding_mask(B, Tk):
    """Row 0 left-padded, row 1 with a pad in the middle, row 2 (if any) all padding."""
    mask = torch.ones(B, Tk, dtype=torch.long)
    mask[0, : Tk // 2] = 0
    if B > 1 and Tk > 2:
        mask[1, Tk // 2] = 0
    if B > 2:
        mask[2] = 0
    return mask


def assert_close_scaled(actual, expected, tol, name=""):
    atol = tol * max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (7, 7), (3, 10), (1, 13)])
@pytest.mark.parametrize("degree,score_bound", [(1, None), (2, None), (3, None), (4, 2.5)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_features_match_oracle_fp64(causal, Tq, Tk, degree, score_bound, padded, chunk_size):
    B, D, Dv = 3, 5, 4
    inputs = make_inputs(B, 2, Tq, Tk, D, Dv)
    kw = dict(scale=1 / math.sqrt(D), degree=degree, causal=causal, score_bound=score_bound,
              attention_mask=padding_mask(B, Tk) if padded else None)
    expected = naive_poly_tensor_attention(*inputs, **kw)
    actual = poly_tensor_attention(*inputs, chunk_size=chunk_size, **kw)
    assert_close_scaled(actual, expected, TOL[torch.float64])


def test_float32_matches_oracle():
    inputs = make_inputs(2, 2, 9, 9, 8, 8, torch.float32)
    kw = dict(scale=0.125, degree=4, attention_mask=padding_mask(2, 9))
    expected = naive_poly_tensor_attention(*[t.double() for t in inputs], **kw).float()
    actual = poly_tensor_attention(*inputs, chunk_size=4, **kw)
    assert actual.dtype == torch.float32
    assert_close_scaled(actual, expected, TOL[torch.float32])


def test_query_without_pairs_is_zero_like_exact_op():
    inputs = make_inputs(3, 1, 6, 6, 4, 4)
    mask = padding_mask(3, 6)
    out = poly_tensor_attention(*inputs, scale=0.5, degree=2, attention_mask=mask)
    exact = tensor_attention(*inputs, scale=0.5, attention_mask=mask)
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # an all-padding row
    assert torch.equal(out[0, :, :2], torch.zeros_like(out[0, :, :2]))  # pad queries before any real token
    assert torch.equal(out == 0, exact == 0)


@pytest.mark.parametrize("op", [poly_tensor_attention, naive_poly_tensor_attention])
@pytest.mark.parametrize("causal", [True, False])
def test_nonfinite_padded_keys_and_values_change_nothing(op, causal):
    """Padded positions never contribute, whatever they hold (as in the exact ops)."""
    q, k1, k2, v1, v2 = make_inputs(3, 2, 6, 6, 4, 4)
    mask = padding_mask(3, 6)
    clean = op(q, k1, k2, v1, v2, scale=0.5, degree=2, attention_mask=mask, causal=causal)
    padded = ~mask.bool()[:, None, :, None]  # [B, 1, T, 1]
    values = (math.nan, math.inf, math.nan, -math.inf)
    poisoned = [t.masked_fill(padded, value) for t, value in zip((k1, k2, v1, v2), values)]
    out = op(q, *poisoned, scale=0.5, degree=2, attention_mask=mask, causal=causal)
    assert torch.equal(out, clean)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("degree,score_bound", [(2, None), (3, 2.0)])
def test_gradients_match_autograd_through_oracle(causal, degree, score_bound):
    B, Tq, Tk, D, Dv = 2, 5, 11, 3, 4
    inputs = make_inputs(B, 2, Tq, Tk, D, Dv, seed=1)
    dout = torch.randn(B, 2, Tq, Dv, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kw = dict(scale=0.4, degree=degree, causal=causal, score_bound=score_bound, attention_mask=padding_mask(B, Tk))

    def grads(fn, **extra):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        return torch.autograd.grad(fn(*leaves, **kw, **extra), leaves, dout)

    for name, g, e in zip("q k1 k2 v1 v2".split(), grads(poly_tensor_attention, chunk_size=3),
                          grads(naive_poly_tensor_attention)):
        assert_close_scaled(g, e, TOL[torch.float64], name)


def saved_numbers(checkpointed: bool) -> int:
    saved = []

    def count(t):
        saved.append(t.numel())
        return t

    n, d = 256, 4
    inputs = [t.requires_grad_(True) for t in make_inputs(1, 1, n, n, d, d)]
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        with torch.set_grad_enabled(True):
            if not checkpointed:  # the same maths, every chunk's prefix sums kept for backward
                from hf_tensor_attn.ops.poly import chunk
                real = torch.ones(1, 1, n, 1, dtype=torch.float64)
                state = chunk.PolyState.zeros(1, 1, num_features(d, 4), d, d, dtype=torch.float64, device="cpu")
                for lo in range(0, n, 32):
                    sl = slice(lo, lo + 32)
                    q = inputs[0][:, :, None, sl]  # [B, H, G=1, C, d]
                    _, state = chunk._query_chunk(state, q, *(t[:, :, sl] for t in inputs[1:]), real[:, :, sl],
                                                  scale=0.5, degree=4, score_bound=None)
            else:
                poly_tensor_attention(*inputs, scale=0.5, degree=4, chunk_size=32)
    return sum(saved)


def test_causal_training_keeps_no_chunk_prefix_sums():
    """Checkpointed chunks: what a causal forward saves for backward grows like n*d + (n/chunk)*r*d, not n*r*d."""
    n, d, r = 256, 4, num_features(4, 4)
    assert saved_numbers(checkpointed=False) > n * r * d  # the prefix sums: what checkpointing avoids
    assert saved_numbers(checkpointed=True) < n * r * d / 4


def test_feature_count_and_factorisation():
    assert num_features(8, 2) == 45 and num_features(8, 8) == 12870
    g = torch.Generator().manual_seed(0)
    q, k1, k2 = (torch.randn(6, dtype=torch.float64, generator=g) for _ in range(3))
    for degree, bound in ((2, None), (5, None), (3, 4.0)):
        u1 = query_features(q, scale=0.3, degree=degree, score_bound=bound)
        assert u1.shape[-1] == num_features(6, degree)
        s = 0.3 * (q * k1 * k2).sum()
        P = sum(c * s**j for j, c in enumerate(polynomial_coefficients(degree, bound)))
        torch.testing.assert_close((u1 * key_features(k1, degree) * key_features(k2, degree)).sum(), P,
                                   rtol=1e-12, atol=1e-12)


def P_on(s, degree, bound=None):
    return sum(c * s**j for j, c in enumerate(polynomial_coefficients(degree, bound)))


def test_even_taylor_is_positive_and_odd_is_not():
    s = torch.linspace(-60, 60, 24001, dtype=torch.float64)
    for degree in (2, 4, 6, 8):
        assert P_on(s, degree).min() > 0
    for degree in (1, 3, 5, 7):
        assert P_on(s, degree).min() < 0


def test_chebyshev_fit_beats_taylor_on_its_interval():
    for degree, R in ((4, 3.0), (6, 5.0), (8, 8.0)):
        s = torch.linspace(-R, R, 2001, dtype=torch.float64)
        cheb = ((P_on(s, degree, R) - s.exp()) / s.exp()).abs().max()
        taylor = ((P_on(s, degree) - s.exp()) / s.exp()).abs().max()
        assert cheb < taylor / 2


def test_chebyshev_on_a_tiny_interval_keeps_every_coefficient():
    """On [-R, R] with small R the top Chebyshev terms round to 0; P still has g + 1 coefficients and fits exp."""
    for degree in (7, 8):
        coefficients = polynomial_coefficients(degree, 0.015625)
        assert len(coefficients) == degree + 1
        s = torch.linspace(-0.015625, 0.015625, 101, dtype=torch.float64)
        assert ((P_on(s, degree, 0.015625) - s.exp()).abs() < 1e-14).all()


def test_negative_polynomial_hits_the_floor_not_a_division_by_negative():
    """Degree 1 (P = 1 + s) with large scores: sum P < 0 for some queries; the floor keeps them finite and equal
    to the oracle, which applies the same floor."""
    inputs = make_inputs(1, 2, 8, 8, 4, 4, seed=3, magnitude=3.0)
    kw = dict(scale=1.0, degree=1)
    scores = torch.einsum("bhtd,bhad,bhcd->bhtac", *inputs[:3])
    keep = torch.ones(8, 8, dtype=torch.bool).tril()
    den = ((1 + scores) * (keep[:, :, None] & keep[:, None, :])).sum((-1, -2))
    assert (den <= 0).any()  # the case under test occurs
    out = poly_tensor_attention(*inputs, **kw)
    assert torch.isfinite(out).all()
    assert_close_scaled(out, naive_poly_tensor_attention(*inputs, **kw), TOL[torch.float64])


@pytest.mark.parametrize("degree", [0, -2, 2.0, True, "2", None])
def test_bad_degree_raises_naming_it(degree):
    inputs = make_inputs(1, 1, 2, 2, 2, 2)
    with pytest.raises(ValueError, match=rf"`degree` must be an int >= 1.*got {degree!r}"):
        poly_tensor_attention(*inputs, scale=0.5, degree=degree)


@pytest.mark.parametrize("score_bound", [0, -1.0, math.inf, math.nan, "3", True])
def test_bad_score_bound_raises_naming_it(score_bound):
    inputs = make_inputs(1, 1, 2, 2, 2, 2)
    with pytest.raises(ValueError, match=r"`score_bound` must be None .* or a finite float > 0.*got"):
        poly_tensor_attention(*inputs, scale=0.5, degree=2, score_bound=score_bound)


def test_bad_shapes_and_mask_raise():
    q, k1, k2, v1, v2 = make_inputs(1, 1, 3, 4, 2, 3)
    with pytest.raises(ValueError, match="`k2` has shape"):
        poly_tensor_attention(q, k1, k2[..., :1], v1, v2, scale=0.5, degree=2)
    with pytest.raises(ValueError, match="`v2` has shape"):
        poly_tensor_attention(q, k1, k2, v1, v2[..., :2], scale=0.5, degree=2)
    with pytest.raises(ValueError, match="`attention_mask` must be"):
        poly_tensor_attention(q, k1, k2, v1, v2, scale=0.5, degree=2, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="needs floating-point inputs"):
        poly_tensor_attention(*(t.long() for t in (q, k1, k2, v1, v2)), scale=0.5, degree=2)
    with pytest.raises(ValueError, match="`chunk_size` must be"):
        poly_tensor_attention(q, k1, k2, v1, v2, scale=0.5, degree=2, chunk_size=0)


def test_automatic_chunks_shrink_with_batch_and_heads(monkeypatch):
    """The prefix sums of a chunk are [B, H, chunk, r, Dv]: the automatic chunk keeps them under CHUNK_NUMBERS
    whatever the batch (a batch of 200 sequences at degree 8 once asked for 1.6G numbers)."""
    from hf_tensor_attn.ops.poly import chunk

    seen = []
    original = chunk._query_chunk

    def recording(state, q, *args, **kw):
        seen.append(q.shape[0] * q.shape[1] * q.shape[3])  # q: [B, H, G, chunk, Dk]
        return original(state, q, *args, **kw)

    monkeypatch.setattr(chunk, "_query_chunk", recording)
    monkeypatch.setattr(chunk, "CHUNK_NUMBERS", 4096)
    for B in (1, 8):
        seen.clear()
        inputs = make_inputs(B, 2, 20, 20, 3, 4)
        expected = naive_poly_tensor_attention(*inputs, scale=0.5, degree=2)
        assert_close_scaled(poly_tensor_attention(*inputs, scale=0.5, degree=2), expected, TOL[torch.float64])
        r = num_features(3, 2)  # 10
        assert max(seen) * r * 4 <= 4096  # B * H * chunk * r * Dv


@pytest.mark.parametrize("causal", [True, False])
def test_grouped_queries_share_one_state(causal):
    """q as [B, H_kv, G, Tq, Dk] (the poly cache's grouped heads) gives what each query head gives on its own, and
    one state for the group."""
    from hf_tensor_attn.ops.poly import chunk

    B, H_kv, G, T, Dk, Dv = 2, 2, 3, 7, 3, 4
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H_kv, G, T, Dk, generator=g, dtype=torch.float64)
    k1, k2 = (torch.randn(B, H_kv, T, Dk, generator=g, dtype=torch.float64) for _ in range(2))
    v1, v2 = (torch.randn(B, H_kv, T, Dv, generator=g, dtype=torch.float64) for _ in range(2))
    real = torch.ones(B, 1, T, 1, dtype=torch.float64)
    real[0, :, :2] = 0
    kw = dict(scale=0.4, degree=2, score_bound=None, causal=causal, chunk_size=3)
    start = chunk.PolyState.zeros(B, H_kv, num_features(Dk, 2), Dk, Dv, dtype=torch.float64, device="cpu")
    grouped, state = chunk.poly_attention_continue(start, q, k1, k2, v1, v2, real, **kw)
    assert grouped.shape == (B, H_kv, G, T, Dv)
    for member in range(G):
        alone, alone_state = chunk.poly_attention_continue(start, q[:, :, member], k1, k2, v1, v2, real, **kw)
        torch.testing.assert_close(grouped[:, :, member], alone, rtol=1e-12, atol=1e-12)
    for a, b in zip(state, alone_state):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_query_weights_are_kept_per_device_and_dtype():
    """`query_features` reuses its weights in q's dtype and device (a decode step on CUDA would otherwise copy them
    host to device at every step), and gives what the float64 definition gives."""
    from hf_tensor_attn.ops.poly import features

    q = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    features._query_weights_on.cache_clear()
    first = query_features(q.float(), scale=0.5, degree=3, score_bound=None)
    second = query_features(q.float(), scale=0.5, degree=3, score_bound=None)
    info = features._query_weights_on.cache_info()
    assert (info.misses, info.hits) == (1, 1) and torch.equal(first, second)
    weights = features._query_weights_on(4, 3, None, 0.5, torch.float32, torch.device("cpu"))
    assert [w.dtype for w in weights] == [torch.float32] * 4
    # U1(q) . U2(k) = sum_j c_j (scale <q, k>)^j for one key k = q's first row (Taylor: c_j = 1/j!)
    k = q[..., :1, :]
    expected = sum((0.5 * (q * k).sum(-1)) ** j / math.factorial(j) for j in range(4))
    got = (query_features(q, scale=0.5, degree=3, score_bound=None) * key_features(k, 3)).sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# Issue #35: the polynomial never turns NaN for a setting it accepts.
@pytest.mark.parametrize("score_bound", [88.0, 100.0, 300.0, 1e3])
def test_score_bound_past_float32_is_refused_with_the_range(score_bound):
    """300 fitted coefficients of 1e97-1e110 (inf in float32, NaN outputs); 1e3 gave NaN coefficients; at 88 the
    coefficients are finite but sums over 256 tokens' pairs were not (`test_largest_accepted_bound_stays_finite`)."""
    inputs = make_inputs(1, 1, 3, 3, 2, 2, torch.float32)
    with pytest.raises(ValueError, match=rf"`score_bound` must be .*<= 42.0 .*got {score_bound!r}"):
        poly_tensor_attention(*inputs, scale=0.5, degree=2, score_bound=score_bound)


def test_fit_that_overflows_float32_at_its_degree_is_refused_naming_the_largest_bound():
    inputs = make_inputs(1, 1, 3, 3, 2, 2, torch.float32)
    with pytest.raises(ValueError, match=r"`score_bound`=42.0 with `degree`=8.*use score_bound <= 39.9"):
        poly_tensor_attention(*inputs, scale=0.5, degree=8, score_bound=42.0)


@pytest.mark.parametrize("degree, score_bound", [(2, 42.0), (8, 39.9)])
def test_largest_accepted_bound_stays_finite_over_many_pairs(degree, score_bound):
    """The largest bound each degree accepts, on 1024 unit-normal tokens (a million pairs) in float32."""
    inputs = make_inputs(1, 2, 1024, 1024, 8, 8, torch.float32, seed=5)
    out = poly_tensor_attention(*inputs, scale=8**-0.5, degree=degree, score_bound=score_bound)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("degree", [2, 8])
def test_tiny_score_bound_fits_the_taylor_polynomial_not_rounding_noise(degree):
    """At R = 1e-30 the float64 fit gave c_2 = 5.9e44 (inf in float32) and NaN outputs; the interpolant of a nearly
    constant exp is the Taylor polynomial."""
    coefficients = polynomial_coefficients(degree, 1e-30)
    assert coefficients == pytest.approx(polynomial_coefficients(degree, None), rel=1e-12)
    inputs = make_inputs(2, 2, 5, 5, 3, 4, torch.float32, seed=4)
    out = poly_tensor_attention(*inputs, scale=0.5, degree=degree, score_bound=1e-30)
    assert torch.isfinite(out).all()
    assert_close_scaled(out, poly_tensor_attention(*inputs, scale=0.5, degree=degree), TOL[torch.float32])


def test_coefficients_of_every_accepted_bound_are_accurate():
    """The fit interpolates exp at the g + 1 Chebyshev nodes of [-R, R] to float64 rounding, however small R is.
    (At large R the power-basis sum cancels in float64 below exp(-R): evaluating it is what loses accuracy.)"""
    for degree in (2, 4, 8):
        for R in (1e-12, 1e-3, 0.5, 4.0):
            c = polynomial_coefficients(degree, R)
            nodes = [R * math.cos(math.pi * (k + 0.5) / (degree + 1)) for k in range(degree + 1)]
            for x in nodes:
                assert sum(cj * x**j for j, cj in enumerate(c)) == pytest.approx(math.exp(x), rel=1e-9)


def test_degenerate_but_finite_fit_warns_and_a_good_one_does_not():
    import warnings

    from hf_tensor_attn.ops.poly.common import PolyFitWarning

    inputs = make_inputs(1, 1, 3, 3, 2, 2, torch.float32)
    with pytest.warns(PolyFitWarning, match=r"score_bound=30.0, degree=2: .*relative error up to"):
        out = poly_tensor_attention(*inputs, scale=0.5, degree=2, score_bound=30.0)
    assert torch.isfinite(out).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        poly_tensor_attention(*inputs, scale=0.5, degree=4, score_bound=2.0)


def test_feature_count_past_the_guard_is_refused_before_building_tables():
    """head_dim 16 at degree 12 is 30M features per head: it was OOM-killed at 22 GB building them."""
    inputs = make_inputs(1, 1, 2, 2, 16, 2, torch.float32)
    with pytest.raises(ValueError, match=r"`degree`=12 with feature width 16 needs r = .*30,421,755.*use degree <= 8"):
        poly_tensor_attention(*inputs, scale=0.25, degree=12)


# Issue #35: empty dimensions and NaN containment in the polynomial ops.
@pytest.mark.parametrize("op", [naive_poly_tensor_attention, poly_tensor_attention])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(0, 1, 2, 2, 4, 3), (1, 0, 2, 2, 4, 3), (1, 1, 0, 2, 4, 3), (1, 1, 0, 0, 4, 3),
                                   (1, 1, 2, 2, 4, 0), (1, 1, 2, 2, 0, 3)])
def test_empty_dimensions_give_empty_or_uniform_outputs(op, causal, shape):
    """ZeroDivisionError (empty batch, heads or value width), `torch.cat` of nothing (no query) and an IndexError
    (key width 0) before; the feature path now agrees with the oracle."""
    inputs = make_inputs(*shape)
    out = op(*inputs, scale=0.5, degree=2, causal=causal)
    assert out.shape == (*shape[:3], shape[5])
    expected = naive_poly_tensor_attention(*inputs, scale=0.5, degree=2, causal=causal)
    torch.testing.assert_close(out, expected, rtol=TOL[torch.float64], atol=TOL[torch.float64])


def test_naive_poly_keeps_a_nan_in_a_later_key_to_the_rows_that_use_it():
    """The oracle spread a NaN in key 3 to every row (P * allowed, 0 * NaN); the feature path kept it to row 3."""
    q, k1, k2, v1, v2 = make_inputs(1, 1, 4, 4, 3, 3)
    for poisoned in ((k1, 3), (v2, 3), (v1, 2)):
        tensor, position = poisoned
        saved = tensor[0, 0, position, 0].item()
        tensor[0, 0, position, 0] = float("nan")
        for op in (naive_poly_tensor_attention, poly_tensor_attention):
            rows = torch.isnan(op(q, k1, k2, v1, v2, scale=0.5, degree=2)).any(-1)[0, 0]
            assert rows.tolist() == [t >= position for t in range(4)], (op.__name__, position)
        tensor[0, 0, position, 0] = saved
