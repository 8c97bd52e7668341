"""The monomial features through which polynomial tensor attention's pair sum factorises (its feature path).

**The factorisation.** s^j = scale^j <q^{(x)j}, k1^{(x)j} * k2^{(x)j}> (tensor powers). The tensor power is
symmetric, so it is summed once per multiset of coordinates (a monomial x^alpha with |alpha| = j) with the
multinomial weight j! / alpha!; hence P(s) = <U1(q), U2(k1) * U3(k2)> with

    U1(q)_alpha = c_j scale^j (j! / alpha!) q^alpha,   U2(k)_alpha = U3(k)_alpha = k^alpha,   |alpha| <= g,

r = C(d + g, g) features (d = 8, g = 2: 45; g = 8: 12,870) against sum_j d^j = 19M for plain tensor powers at
g = 8, which is why the symmetric form is used. Each feature of degree j is one feature of degree j - 1 times one
coordinate, so all r features of a vector cost r multiplications.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch

from .common import polynomial_coefficients


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


@functools.lru_cache(maxsize=64)
def flat_tables(d: int, degree: int, score_bound, scale: float, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tables over all r features in `key_features`' order, for a compiled step: parent [r] and var [r] (feature
    m is feature parent[m] times coordinate var[m]; entry 0, the monomial 1, has neither) and `query_features`'
    weights [r], kept per device as `_indices_on` keeps its indices."""
    parents, variables = [0], [0]
    start, size = 0, 1  # where the previous degree's features begin, and how many there are
    for parent, var, _ in _monomial_tables(d, degree):
        parents += [start + p for p in parent]
        variables += var
        start, size = start + size, len(parent)
    weights = torch.cat(_query_weights_on(d, degree, score_bound, scale, dtype, device))
    with torch.inference_mode(False):
        return (torch.tensor(parents, dtype=torch.long, device=device),
                torch.tensor(variables, dtype=torch.long, device=device), weights)


def key_features(k: torch.Tensor, degree: int) -> torch.Tensor:
    """U2(k) = U3(k) [..., r]: the plain monomials of k."""
    return torch.cat(monomial_features(k, degree), dim=-1)

