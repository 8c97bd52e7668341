"""What polynomial tensor attention's reference and its feature path share: the polynomial P with its checks, the
input checks, the key mask and the denominator floor.

    s_t(a, b) = scale * <q_t, k1_a * k2_b>
    o_t       = sum_(a,b) P(s_t(a, b)) (v1_a * v2_b) / max(sum_(a,b) P(s_t(a, b)), floor_t)

**The polynomial.** `score_bound=None`: the degree-g Taylor polynomial of exp at 0. `score_bound=R`: the degree-g
Chebyshev interpolant of exp on [-R, R] (near-minimax there, poor outside). docs/bench_poly.md measures both.

**The denominator.** A polynomial may go negative (odd-degree Taylor below its one real root; Chebyshev fits
outside [-R, R]); even-degree Taylor polynomials never do. Whatever P, the exact softmax denominator is at least
count_t * exp(-R_t), with count_t the visible pairs and R_t = scale * sum_j |q_tj| max_a |k1_aj| max_b |k2_bj|
>= |s_t(a, b)| (maxima over visible keys), so the denominator is clamped at that floor (and at count_t times the
smallest positive normal number, so it is never 0): a query's weights can then be wrong, but never divided by a
negative or zero sum. A query with no visible pair returns zeros, as `tensor_attention` does.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch

from ..common import check_positions, check_streams

# P reaches about exp(score_bound) on [-score_bound, score_bound] and the sums add it over up to n^2 pairs, in
# float32 at least (float64 only for float64 inputs), whose largest number is exp(88.72). Keeping max |P| on the
# interval below float32's maximum / PAIR_HEADROOM leaves room for 1e20 pairs times values (n = 1e7 tokens with
# |v1 * v2| up to 1e6); at score_bound 88 (no headroom) 256 unit-normal tokens already gave inf / inf = NaN.
FLOAT32_MAX = float(np.finfo(np.float32).max)
PAIR_HEADROOM = 1e20
MAX_SCORE_BOUND = 42.0  # exp(42) = 1.7e18 <= FLOAT32_MAX / PAIR_HEADROOM = 3.4e18
# r = C(d + g, g) monomials per head: their index tables are built once per (d, g) (tens of bytes per feature while
# they are built) and the state holds r (2 Dv + 2) numbers per sequence and head. Past about a million features a
# single head's state or table no longer fits a machine's memory with room to spare (head_dim 16, degree 12 asked
# for 30M features and was killed at 22 GB).
MAX_FEATURES = 1 << 20
# A fit whose pair weights are off by more than this factor somewhere on [-R, R] (relative error of P against
# exp), or of the wrong sign, is finite but no longer a softmax in any useful sense: it warns.
MAX_FIT_ERROR = 1.0


class PolyFitWarning(UserWarning):
    """The polynomial for this `degree` and `score_bound` is finite but far from exp on [-score_bound, score_bound]."""


def check_degree(degree, *, even: bool = False) -> None:
    """`even=True` where exp must be replaced by a polynomial that is positive for every score (the model's layers
    and the "poly" cache: odd Taylor polynomials go negative and their normalised outputs reach 1e9)."""
    if even and (isinstance(degree, bool) or not isinstance(degree, int) or degree < 2 or degree % 2):
        raise ValueError(
            f"`degree` must be an even int >= 2 (an even-degree Taylor polynomial of exp is positive for every score; "
            f"an odd one goes negative), got {degree!r}"
        )
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"`degree` must be an int >= 1 (the degree of the polynomial replacing exp), got {degree!r}")


def check_score_bound(score_bound, degree=None) -> None:
    """None, or a finite float in (0, MAX_SCORE_BOUND]; with `degree`, also one whose fitted coefficients stay finite
    in float32 (`check_fit`)."""
    if score_bound is None:
        return
    if isinstance(score_bound, bool) or not isinstance(score_bound, (int, float)) or not (
        0 < score_bound <= MAX_SCORE_BOUND
    ):
        raise ValueError(
            f"`score_bound` must be None (Taylor polynomial at 0) or a finite float > 0 and <= {MAX_SCORE_BOUND} "
            f"(Chebyshev fit of exp on [-score_bound, score_bound], whose values reach exp(score_bound) and are summed "
            f"over every pair of tokens in float32, which holds up to exp(88.7)), got {score_bound!r}"
        )
    if degree is not None:
        check_fit(degree, score_bound)


def check_feature_count(d: int, degree: int) -> int:
    """r = C(d + g, g), refused past MAX_FEATURES naming the degrees `d` allows."""
    r = num_features(d, degree)
    if r > MAX_FEATURES:
        allowed = max(g for g in range(1, degree) if num_features(d, g) <= MAX_FEATURES) if d > 0 else 0
        raise ValueError(
            f"`degree`={degree} with feature width {d} needs r = C({d} + {degree}, {degree}) = {r:,} monomial features "
            f"per head, past the {MAX_FEATURES:,} this package builds (memory); with width {d} use degree <= {allowed}"
        )
    return r


@functools.lru_cache(maxsize=64)
def fit_error(degree: int, score_bound: float) -> float:
    """max over [-R, R] of |P(s) / exp(s) - 1| for the fitted P (float64, on a fine grid)."""
    s = np.linspace(-score_bound, score_bound, 4001)
    P = np.polynomial.polynomial.polyval(s, polynomial_coefficients(degree, score_bound))
    return float(np.abs(P * np.exp(-s) - 1).max())


def check_fit(degree: int, score_bound: float) -> None:
    """Refuse a fit whose coefficients or values on [-R, R] overflow float32; warn when it is far from exp there."""
    coefficients = polynomial_coefficients(degree, float(score_bound))
    largest = sum(abs(c) * score_bound**j for j, c in enumerate(coefficients))  # >= |P(s)| on [-R, R]
    if not largest <= FLOAT32_MAX / PAIR_HEADROOM:
        raise ValueError(
            f"`score_bound`={score_bound!r} with `degree`={degree}: the fitted polynomial reaches {largest:.3g} on "
            f"[-score_bound, score_bound], past the {FLOAT32_MAX / PAIR_HEADROOM:.3g} whose sums over pairs of tokens "
            f"float32 holds; use score_bound <= "
            f"{largest_score_bound(degree):g} for this degree"
        )
    error = fit_error(degree, float(score_bound))
    if error > MAX_FIT_ERROR:
        warnings.warn(
            f"score_bound={score_bound!r}, degree={degree}: the fitted polynomial is off from exp by a relative "
            f"error up to {error:.3g} on [-score_bound, score_bound] (more than {MAX_FIT_ERROR:g}), so pair weights "
            "are far from softmax's and generations may degenerate; raise `degree` or lower `score_bound` "
            "(docs/bench_poly.md)",
            PolyFitWarning,
            stacklevel=3,
        )


@functools.lru_cache(maxsize=64)
def largest_score_bound(degree: int) -> float:
    """The largest score_bound (to 0.1) whose fit passes `check_fit` at this degree."""
    def fits(R):
        c = polynomial_coefficients(degree, R)
        return sum(abs(x) * R**j for j, x in enumerate(c)) <= FLOAT32_MAX / PAIR_HEADROOM

    lo, hi = 1.0, MAX_SCORE_BOUND
    if fits(hi):
        return hi
    while hi - lo > 0.1:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return math.floor(lo * 10) / 10


def _check_inputs(q, k1, k2, v1, v2, *, scale, degree, attention_mask, causal, score_bound, chunk_size) -> None:
    named = check_streams(q, k1, k2, v1, v2)
    B, H, Tq, Dk = q.shape
    Tk, Dv = k1.shape[2], v1.shape[3]
    # Keys share q's feature width; values may be wider or narrower (the poly layer projects q, k to a small dim).
    for name, expected in (("k1", (B, H, Tk, Dk)), ("k2", (B, H, Tk, Dk)), ("v1", (B, H, Tk, Dv)), ("v2", (B, H, Tk, Dv))):
        if tuple(named[name].shape) != expected:
            raise ValueError(f"`{name}` has shape {tuple(named[name].shape)}; expected {expected} (B, H and the key "
                             "width from `q`, Tk from `k1`, the value width from `v1`)")
    check_positions(q, Tk, scale, attention_mask)
    check_degree(degree)
    check_score_bound(score_bound, degree)
    check_feature_count(Dk, degree)
    if not isinstance(causal, bool):
        raise ValueError(f"`causal` must be True or False, got {causal!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be None (automatic) or an int >= 1, got {chunk_size!r}")


@functools.lru_cache(maxsize=64)
@torch.compiler.assume_constant_result  # solved at trace time in a compiled graph (mpmath does not trace)
def polynomial_coefficients(degree: int, score_bound: float | None) -> tuple[float, ...]:
    """c_0 .. c_g of P(s) = sum_j c_j s^j: Taylor of exp at 0, or the Chebyshev interpolant on [-R, R].

    The interpolant is solved in multiple precision: in float64 its coefficient c_j carries an error of about
    eps / R^j, which made c_2 5.9e44 at R = 1e-30 (exp is nearly constant there, so the fit tends to the Taylor
    polynomial). Callers check R first (`check_score_bound`)."""
    if score_bound is None:
        return tuple(1.0 / math.factorial(j) for j in range(degree + 1))
    import mpmath  # declared; torch installs it anyway (through sympy)

    R = float(score_bound)
    digits = 30 + degree * (3 + max(0, math.ceil(-math.log10(R))))
    with mpmath.workdps(digits):
        nodes = [mpmath.mpf(R) * mpmath.cos(mpmath.pi * (k + mpmath.mpf(1) / 2) / (degree + 1))
                 for k in range(degree + 1)]
        vandermonde = mpmath.matrix([[x**j for j in range(degree + 1)] for x in nodes])
        solution = mpmath.lu_solve(vandermonde, mpmath.matrix([mpmath.exp(x) for x in nodes]))
        return tuple(float(solution[j]) for j in range(degree + 1))


def num_features(d: int, degree: int) -> int:
    """r = C(d + g, g): the monomials of degree <= g in d variables."""
    return math.comb(d + degree, degree)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def key_mask(attention_mask, B: int, Tk: int, dtype, device) -> torch.Tensor:
    """[B, 1, Tk, 1] 1.0 for real keys, 0.0 for padding."""
    if attention_mask is None:
        return torch.ones(B, 1, Tk, 1, dtype=dtype, device=device)
    return attention_mask.to(device=device, dtype=dtype)[:, None, :, None]


def _floor(q, m1, m2, n, scale: float) -> torch.Tensor:
    """count * exp(-R) [B, H, Tq] (module doc): q [B, H, Tq, Dk] (or [B, H, G, Tq, Dk], then [B, H, G, Tq]); m1, m2
    the coordinate-wise max |k| over each query's visible keys (broadcastable to q); n [B, 1, Tq] (broadcastable to
    the result) its visible real keys (count = n^2 pairs)."""
    bound = scale * (q.abs() * m1 * m2).sum(-1)  # [B, H, Tq] >= |s_t(a, b)| for every visible pair
    return n**2 * torch.exp(-bound).clamp_min(torch.finfo(q.dtype).tiny)


def _normalise(num, den, floor):
    """num / max(den, floor); zeros where the query sees no pair (floor 0, numerator exactly 0)."""
    den = torch.maximum(den, floor)
    return num / torch.where(den > 0, den, torch.ones_like(den))[..., None]


def drop_padded(real, *tensors):
    """The tensors [B, H, T, D] with padded positions (`real` [B, 1, T, 1] == 0) set to 0: a padded key or value
    never contributes, but a NaN or inf it holds would survive a zero weight (0 * NaN is NaN) in the sums."""
    return tuple(torch.where(real > 0, t, torch.zeros((), dtype=t.dtype, device=t.device)) for t in tensors)

