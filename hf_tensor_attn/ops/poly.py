"""Polynomial tensor attention (Alman & Song, Algorithm 1): exp of the trilinear score replaced by a polynomial P,
so that the n^3 pair sum factorises through monomial features and costs O(n r d), r = C(d + g, g).

    s_t(a, b) = scale * <q_t, k1_a * k2_b>
    o_t       = sum_(a,b) P(s_t(a, b)) (v1_a * v2_b) / max(sum_(a,b) P(s_t(a, b)), floor_t)

**The factorisation.** s^j = scale^j <q^{(x)j}, k1^{(x)j} * k2^{(x)j}> (tensor powers). The tensor power is
symmetric, so it is summed once per multiset of coordinates (a monomial x^alpha with |alpha| = j) with the
multinomial weight j! / alpha!; hence P(s) = <U1(q), U2(k1) * U3(k2)> with

    U1(q)_alpha = c_j scale^j (j! / alpha!) q^alpha,   U2(k)_alpha = U3(k)_alpha = k^alpha,   |alpha| <= g,

r = C(d + g, g) features (d = 8, g = 2: 45; g = 8: 12,870) against sum_j d^j = 19M for plain tensor powers at
g = 8, which is why the symmetric form is used. Each feature of degree j is one feature of degree j - 1 times one
coordinate, so all r features of a vector cost r multiplications.

Numerator and denominator are then running sums over a and b separately: with S1 = sum_a U2(k1_a) v1_a^T,
S2 likewise, Z1 = sum_a U2(k1_a), Z2, o_t = sum_m U1(q_t)_m S1_m * S2_m / sum_m U1(q_t)_m Z1_m Z2_m.
Causal prefill carries (S1, S2, Z1, Z2) over chunks of positions: O(chunk r d + r d) memory. Under autograd
each chunk is recomputed in backward (activation checkpointing), so training memory is O(n d + (n/chunk) r d).

**The polynomial.** `score_bound=None`: the degree-g Taylor polynomial of exp at 0. `score_bound=R`: the degree-g
Chebyshev interpolant of exp on [-R, R] (near-minimax there, poor outside). docs/bench_poly.md measures both.

**The denominator.** A polynomial may go negative (odd-degree Taylor below its one real root; Chebyshev fits
outside [-R, R]); even-degree Taylor polynomials never do. Whatever P, the exact softmax denominator is at least
count_t * exp(-R_t), with count_t the visible pairs and R_t = scale * sum_j |q_tj| max_a |k1_aj| max_b |k2_bj|
>= |s_t(a, b)| (maxima over visible keys), so the denominator is clamped at that floor (and at count_t times the
smallest positive normal number, so it is never 0): a query's weights can then be wrong, but never divided by a
negative or zero sum. A query with no visible pair returns zeros, as `tensor_attention` does.

`naive_poly_tensor_attention` evaluates P on the explicit Tq x Tk x Tk scores: the oracle of the feature path.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.utils.checkpoint

from .common import check_positions, check_streams

# Numbers in one chunk's prefix sums (B * H * chunk * r * Dv) or key features (B * H * chunk * r): automatic chunk
# sizes keep them under this, so a chunk's scratch is at most ~8-16 MB whatever the batch, heads and degree.
CHUNK_NUMBERS = 1 << 21
MAX_CHUNK = 128
MAX_KEY_CHUNK = 1024


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


@functools.lru_cache(maxsize=64)
@torch.compiler.assume_constant_result  # a compiled graph takes the tables as constants, built at trace time
def _monomial_tables(d: int, degree: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...]], ...]:
    """Per degree j >= 1, over the monomials of degree j in lexicographic order: the index of its parent (itself
    divided by its last variable) among degree j - 1 monomials, that last variable, and j! / alpha!."""
    levels = []
    previous = {(): 0}
    for j in range(1, degree + 1):
        current, parents, variables, weights = {}, [], [], []
        for combo in itertools.combinations_with_replacement(range(d), j):
            current[combo] = len(current)
            parents.append(previous[combo[:-1]])
            variables.append(combo[-1])
            counts = np.bincount(combo, minlength=d)
            weights.append(math.factorial(j) / math.prod(math.factorial(int(c)) for c in counts))
        levels.append((tuple(parents), tuple(variables), tuple(weights)))
        previous = current
    return tuple(levels)


def _monomials(d: int, degree: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`_monomial_tables` as tensors: parents and variables long, weights float64 (long even when empty, d = 0)."""
    # Not inference tensors (a first call under inference_mode would make them so, and `_indices_on` keeps them),
    # or a later training call could not save them for backward.
    with torch.inference_mode(False):
        return [(torch.tensor(parents, dtype=torch.long), torch.tensor(variables, dtype=torch.long),
                 torch.tensor(weights, dtype=torch.float64))
                for parents, variables, weights in _kept(_monomial_tables)(d, degree)]


@functools.lru_cache(maxsize=64)
def _indices_on(d: int, degree: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`_monomials`' parent and variable indices on `device`, kept: a decode step on CUDA would otherwise copy them
    host to device at every call."""
    with torch.inference_mode(False):
        return [(parent.to(device), var.to(device)) for parent, var, _ in _monomials(d, degree)]


def _kept(function):
    """A function's cached version, or the function itself inside a compiled graph (whose constants need no cache;
    dynamo would warn that it bypasses the cache)."""
    return function.__wrapped__ if torch.compiler.is_compiling() else function


def monomial_features(x: torch.Tensor, degree: int) -> list[torch.Tensor]:
    """x [..., d] -> per degree j = 0..g the monomials x^alpha, |alpha| = j: [..., C(d + j - 1, j)] each."""
    features = [x.new_ones(*x.shape[:-1], 1)]  # the monomial 1, also for d = 0
    for parent, var in _kept(_indices_on)(x.shape[-1], degree, x.device):
        features.append(features[-1][..., parent] * x[..., var])
    return features


def query_features(q: torch.Tensor, *, scale: float, degree: int, score_bound) -> torch.Tensor:
    """U1(q) [..., r]: the monomials of q weighted by c_j scale^j j!/alpha!."""
    levels = monomial_features(q, degree)
    weights = _kept(_query_weights_on)(q.shape[-1], degree, score_bound, float(scale), q.dtype, q.device)
    return torch.cat([level * w for level, w in zip(levels, weights)], dim=-1)


@functools.lru_cache(maxsize=64)
def _query_weights_on(d: int, degree: int, score_bound, scale: float, dtype: torch.dtype,
                      device: torch.device) -> list[torch.Tensor]:
    """Per degree j = 0..g the weights c_j scale^j j!/alpha! of `query_features`, in q's dtype on q's device, kept as
    `_indices_on` keeps its indices: computed in float64 on the CPU (not every device has float64, e.g. MPS), they
    would otherwise be copied to the device at every decode step."""
    coefficients = _kept(polynomial_coefficients)(degree, score_bound)
    levels = [torch.ones(1, dtype=torch.float64)] + [weights for _, _, weights in _monomials(d, degree)]
    with torch.inference_mode(False):
        return [(w * (c * scale**j)).to(dtype=dtype, device=device)
                for j, (w, c) in enumerate(zip(levels, coefficients))]


def key_features(k: torch.Tensor, degree: int) -> torch.Tensor:
    """U2(k) = U3(k) [..., r]: the plain monomials of k."""
    return torch.cat(monomial_features(k, degree), dim=-1)


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


def denominator_floor(q, k1, k2, real, *, scale: float, causal: bool) -> torch.Tensor:
    """The floor of every query from the whole key sequence at once (the oracle's way; `real` [B, 1, Tk, 1])."""
    Tq, Tk = q.shape[2], k1.shape[2]
    if causal:
        m1 = torch.cummax(k1.abs() * real, dim=2).values[:, :, Tk - Tq :]  # [B, H, Tq, Dk] max over a <= t
        m2 = torch.cummax(k2.abs() * real, dim=2).values[:, :, Tk - Tq :]
        n = torch.cumsum(real[..., 0], dim=2)[:, :, Tk - Tq :]  # [B, 1, Tq]
    else:
        m1, m2 = (k1.abs() * real).amax(dim=2, keepdim=True), (k2.abs() * real).amax(dim=2, keepdim=True)
        n = real[..., 0].sum(dim=2, keepdim=True)
    return _floor(q, m1, m2, n, scale)


def _normalise(num, den, floor):
    """num / max(den, floor); zeros where the query sees no pair (floor 0, numerator exactly 0)."""
    den = torch.maximum(den, floor)
    return num / torch.where(den > 0, den, torch.ones_like(den))[..., None]


def naive_poly_tensor_attention(
    q, k1, k2, v1, v2, *, scale, degree, attention_mask=None, causal=True, score_bound=None, chunk_size=None
):
    """The oracle: P evaluated on all Tq x Tk x Tk explicit scores (Horner), masked sums, the same floor.

    Computes in float64 for float64 inputs and float32 otherwise; returns q's dtype. `chunk_size` is accepted for
    the shared signature and unused."""
    _check_inputs(q, k1, k2, v1, v2, scale=scale, degree=degree, attention_mask=attention_mask, causal=causal,
                  score_bound=score_bound, chunk_size=chunk_size)
    B, H, Tq, _ = q.shape
    Tk = k1.shape[2]
    dtype = q.dtype
    if Tq == 0:  # no query (and perhaps no key): the floor below would reduce over an empty dimension
        return q.new_zeros(B, H, 0, v1.shape[-1])
    q, k1, k2, v1, v2 = (t.to(_compute_dtype(dtype)) for t in (q, k1, k2, v1, v2))
    real = key_mask(attention_mask, B, Tk, q.dtype, q.device)
    k1, k2, v1, v2 = drop_padded(real, k1, k2, v1, v2)
    scores = torch.einsum("bhtd,bhad,bhcd->bhtac", q, k1, k2) * scale  # [B, H, Tq, Tk, Tk]
    P = torch.zeros_like(scores)
    for c in reversed(polynomial_coefficients(degree, score_bound)):
        P = P * scores + c
    allowed = real[:, :, None, :, 0, None] * real[:, :, None, None, :, 0]  # [B, 1, 1, Tk, Tk]
    if causal:
        t = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
        seen = (torch.arange(Tk, device=q.device)[None, :] <= t).to(q.dtype)  # [Tq, Tk]
        allowed = allowed * seen[:, :, None] * seen[:, None, :]  # [B, 1, Tq, Tk, Tk]
        # Each query multiplies in only the values it may use: a NaN in a later one would survive a zero weight.
        v1, v2 = (torch.where(seen[:, :, None] > 0, v[:, :, None], 0) for v in (v1, v2))  # [B, H, Tq, Tk, Dv]
    else:
        v1, v2 = v1[:, :, None], v2[:, :, None]  # [B, H, 1, Tk, Dv]
    P = torch.where(allowed > 0, P, 0)  # not P * allowed: the score of a pair with a later NaN key is NaN
    num = torch.einsum("bhtac,bhtad,bhtcd->bhtd", P, v1.expand(-1, -1, Tq, -1, -1), v2.expand(-1, -1, Tq, -1, -1))
    den = P.sum(dim=(-1, -2))
    floor = denominator_floor(q, k1, k2, real, scale=float(scale), causal=causal)
    return _normalise(num, den, floor).to(dtype)


def drop_padded(real, *tensors):
    """The tensors [B, H, T, D] with padded positions (`real` [B, 1, T, 1] == 0) set to 0: a padded key or value
    never contributes, but a NaN or inf it holds would survive a zero weight (0 * NaN is NaN) in the sums."""
    return tuple(torch.where(real > 0, t, torch.zeros((), dtype=t.dtype, device=t.device)) for t in tensors)


def _auto_chunk(per_position: int, longest: int) -> int:
    """Positions per chunk such that chunk * per_position numbers stay under CHUNK_NUMBERS (at least 1)."""
    return max(1, min(longest, CHUNK_NUMBERS // max(per_position, 1)))  # 0 for an empty batch or width


class PolyState(NamedTuple):
    """What the causal recurrence carries between chunks (and what the `poly` cache layer holds), per sequence
    and head: the feature sums and what the denominator floor needs. Size O(r (Dv + 1) + Dk), whatever n."""

    S1: torch.Tensor  # [B, H, r, Dv] sum_a U2(k1_a) v1_a^T
    S2: torch.Tensor  # [B, H, r, Dv] sum_b U3(k2_b) v2_b^T
    Z1: torch.Tensor  # [B, H, r]     sum_a U2(k1_a)
    Z2: torch.Tensor  # [B, H, r]     sum_b U3(k2_b)
    M1: torch.Tensor  # [B, H, Dk]    max_a |k1_a| per coordinate
    M2: torch.Tensor  # [B, H, Dk]    max_b |k2_b|
    N: torch.Tensor  # [B, 1]        real keys so far

    @classmethod
    def zeros(cls, B: int, H: int, r: int, Dk: int, Dv: int, *, dtype, device) -> PolyState:
        z = functools.partial(torch.zeros, dtype=dtype, device=device)
        return cls(z(B, H, r, Dv), z(B, H, r, Dv), z(B, H, r), z(B, H, r), z(B, H, Dk), z(B, H, Dk), z(B, 1))


def _accumulate(state: PolyState, k1, k2, v1, v2, real, degree: int) -> PolyState:
    """Add keys [B, H, C, Dk] and values [B, H, C, Dv] (mask `real` [B, 1, C, 1]) to the state, no query."""
    f1, f2 = key_features(k1, degree) * real, key_features(k2, degree) * real  # [B, H, C, r]
    return PolyState(
        state.S1 + torch.einsum("bhcm,bhcd->bhmd", f1, v1), state.S2 + torch.einsum("bhcm,bhcd->bhmd", f2, v2),
        state.Z1 + f1.sum(2), state.Z2 + f2.sum(2),
        torch.maximum(state.M1, (k1.abs() * real).amax(2)), torch.maximum(state.M2, (k2.abs() * real).amax(2)),
        state.N + real[:, 0, :, 0].sum(1, keepdim=True),
    )


def _query_chunk(state: PolyState, q, k1, k2, v1, v2, real, *, scale: float, degree: int, score_bound):
    """Causal outputs of C positions that are all queries, continuing `state`; q is [B, H, G, C, Dk] (G query heads
    per key/value head); returns (out [B, H, G, C, Dv], state).

    The prefix sums are [B, H, C, r, Dv]: the O(chunk r d) memory of the recurrence, shared by the G query heads."""
    uq = query_features(q, scale=scale, degree=degree, score_bound=score_bound)  # [B, H, G, C, r]
    f1, f2 = key_features(k1, degree) * real, key_features(k2, degree) * real
    s1 = state.S1[:, :, None] + torch.cumsum(f1[..., None] * v1[:, :, :, None, :], dim=2)  # [B, H, C, r, Dv]
    s2 = state.S2[:, :, None] + torch.cumsum(f2[..., None] * v2[:, :, :, None, :], dim=2)
    z1 = state.Z1[:, :, None] + torch.cumsum(f1, dim=2)  # [B, H, C, r]
    z2 = state.Z2[:, :, None] + torch.cumsum(f2, dim=2)
    m1 = torch.maximum(state.M1[:, :, None], torch.cummax(k1.abs() * real, dim=2).values)  # [B, H, C, Dk]
    m2 = torch.maximum(state.M2[:, :, None], torch.cummax(k2.abs() * real, dim=2).values)
    n = state.N[:, :, None] + torch.cumsum(real[..., 0], dim=2)  # [B, 1, C]
    out = _normalise(torch.einsum("bhgcm,bhcmd->bhgcd", uq, s1 * s2), (uq * (z1 * z2)[:, :, None]).sum(-1),
                     _floor(q, m1[:, :, None], m2[:, :, None], n[:, :, None], scale))
    return out, PolyState(s1[:, :, -1], s2[:, :, -1], z1[:, :, -1], z2[:, :, -1], m1[:, :, -1], m2[:, :, -1], n[:, :, -1])


def poly_attention_continue(state: PolyState, q, k1, k2, v1, v2, real, *, scale: float, degree: int, score_bound,
                            causal: bool = True, chunk_size: int | None = None):
    """Attention of q (the last Tq of the Tk new positions) continuing `state`: (out [B, H, Tq, Dv], new state).

    Inputs already checked and in the compute dtype; `real` is the [B, 1, Tk, 1] key mask. The op runs it from
    an empty state; the `poly` cache layer from the state it holds. q may also be [B, H, G, Tq, Dk], G query heads
    per key/value head (out [B, H, G, Tq, Dv]): the state and its prefix sums are then computed once per group."""
    grouped = q.dim() == 5
    q = q if grouped else q[:, :, None]  # [B, H, G, Tq, Dk]
    k1, k2, v1, v2 = drop_padded(real, k1, k2, v1, v2)
    Tq, Tk, Dk, Dv = q.shape[3], k1.shape[2], q.shape[4], v1.shape[3]
    BH, r = q.shape[0] * q.shape[1], num_features(Dk, degree)
    C = chunk_size or _auto_chunk(BH * r * Dv, MAX_CHUNK)  # prefix sums [B, H, C, r, Dv]
    # Keys with no query among them need no per-position prefix sums, only [B, H, C, r] features: longer chunks.
    C_keys = chunk_size or _auto_chunk(BH * r, MAX_KEY_CHUNK)
    first_query = Tk - Tq if causal else Tk  # bidirectional: every key goes into the state before any query
    for lo in range(0, first_query, C_keys):
        sl = slice(lo, min(lo + C_keys, first_query))
        state = _accumulate(state, k1[:, :, sl], k2[:, :, sl], v1[:, :, sl], v2[:, :, sl], real[:, :, sl], degree)
    outs = []
    if not causal:
        S, Z = state.S1 * state.S2, state.Z1 * state.Z2  # [B, H, r, Dv], [B, H, r]
        M1, M2, N = (x[:, :, None, None] for x in (state.M1, state.M2, state.N))
        floor = _floor(q, M1, M2, N, scale)  # [B, H, G, Tq]
        for lo in range(0, Tq, C):
            uq = query_features(q[:, :, :, lo : lo + C], scale=scale, degree=degree, score_bound=score_bound)
            outs.append(_normalise(uq @ S[:, :, None], torch.einsum("bhgcm,bhm->bhgc", uq, Z),
                                   floor[:, :, :, lo : lo + C]))
        out = torch.cat(outs, dim=3) if outs else q.new_zeros(*q.shape[:-1], Dv)  # no query: [B, H, G, 0, Dv]
        return (out if grouped else out[:, :, 0]), state

    # Under autograd each chunk is recomputed in backward: only the inputs and the carried states stay saved.
    checkpoint = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k1, k2, v1, v2, *state))
    step = functools.partial(_query_chunk, scale=scale, degree=degree, score_bound=score_bound)
    for lo in range(first_query, Tk, C):
        hi = min(lo + C, Tk)
        args = (state, q[:, :, :, lo - first_query : hi - first_query], k1[:, :, lo:hi], k2[:, :, lo:hi],
                v1[:, :, lo:hi], v2[:, :, lo:hi], real[:, :, lo:hi])
        if checkpoint:
            out, state = torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False)
            state = PolyState(*state)
        else:
            out, state = step(*args)
        outs.append(out)
    out = torch.cat(outs, dim=3) if outs else q.new_zeros(*q.shape[:-1], Dv)
    return (out if grouped else out[:, :, 0]), state


def poly_tensor_attention(
    q, k1, k2, v1, v2, *, scale, degree, attention_mask=None, causal=True, score_bound=None, chunk_size=None
):
    """Polynomial tensor attention through monomial features (module doc); signature of the oracle
    `naive_poly_tensor_attention`. q, k1, k2 are [B, H, ., Dk], v1, v2 [B, H, Tk, Dv]; the Tq queries are the last Tq
    of the Tk positions. `causal=False` is the seed's bidirectional Algorithm 1 (every real pair). `chunk_size`
    positions are processed at a time (None: as many as keep B * H * chunk * r * Dv under 2M numbers).

    Computes in float64 for float64 inputs and float32 otherwise; returns q's dtype. Differentiable.
    """
    _check_inputs(q, k1, k2, v1, v2, scale=scale, degree=degree, attention_mask=attention_mask, causal=causal,
                  score_bound=score_bound, chunk_size=chunk_size)
    B, H, _, Dk = q.shape
    Tk, Dv = k1.shape[2], v1.shape[3]
    dtype = q.dtype
    q, k1, k2, v1, v2 = (t.to(_compute_dtype(dtype)) for t in (q, k1, k2, v1, v2))
    state = PolyState.zeros(B, H, num_features(Dk, degree), Dk, Dv, dtype=q.dtype, device=q.device)
    real = key_mask(attention_mask, B, Tk, q.dtype, q.device)
    out, _ = poly_attention_continue(state, q, k1, k2, v1, v2, real, scale=float(scale), degree=degree,
                                     score_bound=score_bound, causal=causal, chunk_size=chunk_size)
    return out.to(dtype)
