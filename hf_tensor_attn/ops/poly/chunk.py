"""Polynomial tensor attention through monomial features (`features`), O(n r d) for n positions, r = C(d + g, g).

Numerator and denominator are running sums over a and b separately: with S1 = sum_a U2(k1_a) v1_a^T,
S2 likewise, Z1 = sum_a U2(k1_a), Z2, o_t = sum_m U1(q_t)_m S1_m * S2_m / sum_m U1(q_t)_m Z1_m Z2_m.
Causal prefill carries (S1, S2, Z1, Z2) over chunks of positions: O(chunk r d + r d) memory. Under autograd
each chunk is recomputed in backward (activation checkpointing), so training memory is O(n d + (n/chunk) r d).
The polynomial P and the denominator's floor: `common`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.utils.checkpoint

from .common import _check_inputs, _compute_dtype, _floor, _normalise, drop_padded, key_mask, num_features
from .features import flat_tables, key_features, query_features

# Numbers in one chunk's prefix sums (B * H * chunk * r * Dv) or key features (B * H * chunk * r): automatic chunk
# sizes keep them under this, so a chunk's scratch is at most ~8-16 MB whatever the batch, heads and degree.
CHUNK_NUMBERS = 1 << 21
MAX_CHUNK = 128
MAX_KEY_CHUNK = 1024


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


def _decode_step(state: PolyState, q, k1, k2, v1, v2, real, *, scale: float, degree: int, score_bound,
                 scratch: dict, loops=None):
    """`_query_chunk` of one position that is also the query, with the state updated in place (rank-one additions)
    and S1 * S2 formed in `scratch["product"]` ([B, H, r, Dv], kept in the caller's dict from step to step): the
    chunk's prefix sums are several fresh [B, H, 1, r, Dv] tensors per step, as large as the state. No autograd. Padded keys and values need not be zeroed:
    a padded token adds nothing.

    `loops`: the compiled library (`ops.extension`) for CPU tensors, whose `poly_step` does all of it in one call and
    one pass over the state (`csrc/tiles.cpp`); these torch ops are its reference."""
    state = PolyState(*(t.contiguous() for t in state))  # a chunked step's state is a view of its prefix sums
    if loops is not None:
        parent, var, weight = flat_tables(q.shape[-1], degree, score_bound, float(scale), q.dtype, q.device)
        return loops.poly_step(*state, q, k1, k2, v1, v2, real, parent, var, weight, scale), state
    k1, k2, v1, v2 = drop_padded(real, k1, k2, v1, v2)
    uq = query_features(q, scale=scale, degree=degree, score_bound=score_bound)  # [B, H, G, 1, r]
    f1, f2 = key_features(k1, degree) * real, key_features(k2, degree) * real  # [B, H, 1, r]
    B, H, G = q.shape[:3]
    r, Dv = f1.shape[-1], v1.shape[-1]
    for S, f, v in ((state.S1, f1, v1), (state.S2, f2, v2)):  # S += f^T v
        S.view(B * H, r, Dv).baddbmm_(f.view(B * H, 1, r).transpose(1, 2), v.reshape(B * H, 1, Dv))
    state.Z1.add_(f1[:, :, 0])
    state.Z2.add_(f2[:, :, 0])
    torch.maximum(state.M1, (k1.abs() * real)[:, :, 0], out=state.M1)
    torch.maximum(state.M2, (k2.abs() * real)[:, :, 0], out=state.M2)
    state.N.add_(real[:, :, 0, 0])
    product = scratch.get("product")
    if product is None or product.shape != state.S1.shape:
        product = scratch["product"] = torch.empty_like(state.S1)
    torch.mul(state.S1, state.S2, out=product)
    num = torch.bmm(uq.view(B * H, G, r), product.view(B * H, r, Dv)).view(B, H, G, 1, Dv)
    den = (uq * (state.Z1 * state.Z2)[:, :, None, None]).sum(-1)  # [B, H, G, 1]
    floor = _floor(q, state.M1[:, :, None, None], state.M2[:, :, None, None], state.N[:, :, None, None], scale)
    return _normalise(num, den, floor), state


def poly_attention_continue(state: PolyState, q, k1, k2, v1, v2, real, *, scale: float, degree: int, score_bound,
                            causal: bool = True, chunk_size: int | None = None, scratch: dict | None = None,
                            loops=None):
    """Attention of q (the last Tq of the Tk new positions) continuing `state`: (out [B, H, Tq, Dv], new state).

    Inputs already checked and in the compute dtype; `real` is the [B, 1, Tk, 1] key mask. The op runs it from
    an empty state; the `poly` cache layer from the state it holds. q may also be [B, H, G, Tq, Dk], G query heads
    per key/value head (out [B, H, G, Tq, Dv]): the state and its prefix sums are then computed once per group.
    `scratch`: a dict from a caller that owns `state` (contiguous) and lets a decode step (one new position, the
    query, no gradient) update it in place, where the torch-ops step keeps its buffer from step to step; `loops` the compiled library for that step (the door's
    choice, `dispatch.poly_attention_continue`)."""
    grouped = q.dim() == 5
    q = q if grouped else q[:, :, None]  # [B, H, G, Tq, Dk]
    Tq, Tk, Dk, Dv = q.shape[3], k1.shape[2], q.shape[4], v1.shape[3]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k1, k2, v1, v2, *state))
    if scratch is not None and Tq == Tk == 1 and causal and not needs_grad:
        out, state = _decode_step(state, q, k1, k2, v1, v2, real, scale=scale, degree=degree,
                                  score_bound=score_bound, scratch=scratch, loops=loops)
        return (out if grouped else out[:, :, 0]), state
    k1, k2, v1, v2 = drop_padded(real, k1, k2, v1, v2)
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
    checkpoint = needs_grad
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

