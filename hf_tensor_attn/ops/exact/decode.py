"""One-query decode kernels: the four cache matrices (paper Def. 3.7) as GEMM-shaped products, and the two-matrix
layout's explicit pair rows (Def. 3.8). Their reference is `naive.naive_tensor_attention`.

For a query q and cached K1, K2, V1, V2 (i x d each), `four_cache_decode_step` computes

    S = (K1 * (scale q)) @ K2^T            # [i, i] scores, one (i x d) @ (d x i) product (in blocks of rows a)
    P = exp(S - shift) over allowed pairs  # shift = max S, or 0 when a bound on |S| makes exp safe
    o = sum_a v1_a * (P @ V2)_a / sum(P)   # (i x i) @ (i x d), then a weighted row sum

About 4 i^2 d flops and at most one block of scores as scratch; the i^2 x d Kronecker matrix K1 ⊘ K2 is never
formed.
"""

from __future__ import annotations

import torch

from ..common import (EXP_FLOOR, EXP_HEADROOM, all_finite, finite_or_zero, fold_groups, masked_softmax, repeat_kv,
                     unfold_groups)

# Scores per block of the in-place decode step (B * H * rows * n2), 16 MiB in fp32: it bounds the scratch while
# keeping the number of kernel launches (each a parallel region) small.
_SCORES_PER_BLOCK = 1 << 22


class DecodeWorkspace:
    """A flat scratch buffer for decode steps, owned by whoever decodes (a cache layer keeps one).

    Fresh MiB-sized tensors every step cost on CPU about as much as the elementwise work: the allocator maps new
    pages and the kernels page-fault them in. The buffer grows by doubling, so a context growing one token per step
    reallocates O(log i) times.
    """

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self.buffer
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            same_kind = buf is not None and buf.dtype == dtype and buf.device == device
            size = max(numel, 2 * buf.numel()) if same_kind else numel
            self.buffer = buf = None  # drop the old one before allocating the new one
            buf = self.buffer = torch.empty(size, dtype=dtype, device=device)
        return buf[:numel]


def four_cache_decode_step(q, k1, k2, v1, v2, *, scale, w1=None, w2=None, attention_mask=None, workspace=None,
                           loops=None):
    """Tensor attention of one decode position q [B, H, 1, D] over cached [B, H_kv, Tk, D] streams, without autograd.

    Same result as `naive_tensor_attention` with Tq = 1. The G query heads of a key/value group become G * rows rows
    of one GEMM against that head's K2 and V2, which are never repeated. `loops`: the compiled CPU library
    (`ops.extension`), whose `decode_step` runs the whole step as one call, or None for the torch ops below, whose
    intermediates live in `workspace` (a `DecodeWorkspace`; a fresh one when None). Inputs are checked by the caller
    (`ops.dispatch`), which also picks `loops`.
    """
    if loops is not None:
        return _compiled_step(loops, q, k1, k2, v1, v2, scale, w1, w2, attention_mask)
    Tk = k1.shape[2]
    # The windows only keep the last w1 (w2) positions of each stream: slice instead of masking.
    n1 = Tk if w1 is None else min(w1, Tk)
    n2 = Tk if w2 is None else min(w2, Tk)
    k1, v1 = k1[:, :, Tk - n1 :], v1[:, :, Tk - n1 :]  # [B, H_kv, n1, D]
    k2, v2 = k2[:, :, Tk - n2 :], v2[:, :, Tk - n2 :]  # [B, H_kv, n2, D]
    real1 = real2 = None
    if attention_mask is not None:
        real = attention_mask.to(device=q.device, dtype=torch.bool)
        real1, real2 = real[:, Tk - n1 :], real[:, Tk - n2 :]  # [B, n1], [B, n2]
        # A padded pair weighs 0, but 0 * NaN is NaN: padded values must not hold anything.
        v1 = v1.masked_fill(~real1[:, None, :, None], 0)
        v2 = v2.masked_fill(~real2[:, None, :, None], 0)
    dtype = q.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k1, k2, v1, v2 = (t.to(compute) for t in (q, k1, k2, v1, v2))  # no copy when already `compute`
    # The scale is folded into q (D numbers), not into the i x i scores.
    out = _decode_in_place(q * scale, k1, k2, v1, v2, real1, real2, workspace or DecodeWorkspace())
    return out.to(dtype)


_NO_MASK = torch.empty(0, dtype=torch.bool)


def _compiled_step(loops, q, k1, k2, v1, v2, scale, w1, w2, attention_mask):
    """The step as one call of the compiled loop (`csrc/tiles.cpp: decode_step`), which reads the windows and the
    cache's strided views in place: at short context a step is a few microseconds of arithmetic, and each torch op
    around it costs about as much."""
    real = _NO_MASK
    if attention_mask is not None:
        real = attention_mask.to(torch.bool)
        if bool(real.all()):  # CPU tensors: nothing to wait for
            real = _NO_MASK
        else:
            # The loop never reads a padded v1 row, but a padded v2 row meets a zero weight in a GEMM, and 0 * NaN is
            # NaN. A cache stores padded values finite (`TensorAttnCache.attend`): a copy only for other callers.
            if not all_finite(v2):
                v2 = v2.masked_fill(~real[:, None, :, None], 0)
            real = real.contiguous()
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k1, k2, v1, v2 = (t.float() for t in (q, k1, k2, v1, v2))
    out = loops.decode_step(q, k1, k2, v1, v2, real, _NO_MASK, _NO_MASK, w1 or 0, w2 or 0, float(scale),
                            EXP_FLOOR[q.dtype])
    return out if out.dtype == dtype else out.to(dtype)


def _block_rows(B: int, H: int, n1: int, n2: int) -> int:
    return min(n1, max(16, _SCORES_PER_BLOCK // (B * H * n2)))


def decode_scratch_elements(B: int, H: int, n1: int, n2: int, D: int) -> int:
    """Elements of scratch one no-grad `four_cache_decode` step uses on CPU: a block of scores, its P V2 rows and
    K1 * q. O(i d + block), not O(i^2): the i x i scores never exist at once."""
    rows = _block_rows(B, H, n1, n2)
    return B * H * (rows * n2 + rows * D + n1 * D)


def _decode_in_place(qs, k1, k2, v1, v2, real1, real2, workspace):
    """The decode step in blocks of rows a (one block up to `_SCORES_PER_BLOCK` scores, e.g. i = 1024 with 4 heads),
    so the scratch is O(i d + block) rather than O(i^2) per head at long contexts. Each block runs GEMM, max,
    exp and sum in place, GEMM; blocks are combined by their own max shifts, as in FlashAttention.

    qs is [B, H, 1, D], the streams [B, H_kv, n, D]: the rows (g, a) of a key/value group's G query heads share one
    GEMM with that head's K2 (and V2), and [B, H_kv, G * r, ...] results are read as [B, H, r, ...]."""
    B, H, _, D = qs.shape
    H_kv, n1 = k1.shape[1], k1.shape[2]
    G = H // H_kv
    n2 = k2.shape[2]
    rows = _block_rows(B, H, n1, n2)
    grouped_q = qs.view(B, H_kv, G, 1, D)
    # Every intermediate lives in the reused scratch: on CPU a fresh tensor of a few MiB costs page faults comparable
    # to the elementwise work itself.
    buf = workspace.get(decode_scratch_elements(B, H, n1, n2, D), k1.dtype, k1.device)
    scores_buf = buf[: B * H * rows * n2]
    pv_buf = buf[B * H * rows * n2 : B * H * rows * (n2 + D)]
    kq = buf[B * H * rows * (n2 + D) :].view(B, H_kv, G, n1, D)
    torch.mul(k1[:, :, None], grouped_q, out=kq)  # [B, H_kv, G, n1, D]
    k2t = k2.transpose(-1, -2)  # [B, H_kv, D, n2]
    # |score(a, b)| <= |kq_a| |k2_b| (Cauchy-Schwarz), an O(i d) bound. When it is small, exp(score) can neither
    # overflow nor lose the largest terms, and softmax does not depend on the shift: skip the max pass and the
    # subtraction, two of the four elementwise trips over the scores.
    bound = kq.norm(dim=-1).amax(-1) * k2.norm(dim=-1).amax(-1)[:, :, None]  # [B, H_kv, G]
    unshifted = bool((bound <= EXP_HEADROOM.get(kq.dtype, 0.0)).all())
    shifts, denoms, outs = [], [], []
    for a0 in range(0, n1, rows):
        a1 = min(a0 + rows, n1)
        r = a1 - a0
        kq_rows = kq[:, :, :, a0:a1].reshape(B, H_kv, G * r, D)  # a view when the block holds every row
        scores = torch.matmul(kq_rows, k2t, out=scores_buf[: B * H * r * n2].view(B, H_kv, G * r, n2))
        scores = scores.view(B, H, r, n2)
        if real1 is not None:
            scores.masked_fill_(~real1[:, None, a0:a1, None], float("-inf"))  # pairs whose first token is a pad
            scores.masked_fill_(~real2[:, None, None, :], float("-inf"))  # ... or whose second is
        flat = scores.view(B, H, r * n2)
        if unshifted:
            block_max = flat.new_zeros(B, H, 1)  # the shift used: none
            flat.exp_()  # unnormalised probabilities, in place
        else:
            block_max = flat.amax(-1, keepdim=True)  # [B, H, 1]; -inf when the block has no allowed pair
            shift = block_max if real1 is None else finite_or_zero(block_max)
            flat.sub_(shift).exp_()
        denoms.append(flat.sum(-1, keepdim=True))  # [B, H, 1]
        grouped_scores = scores.view(B, H_kv, G * r, n2)
        pv = torch.matmul(grouped_scores, v2, out=pv_buf[: B * H * r * D].view(B, H_kv, G * r, D))
        pv = pv.view(B, H_kv, G, r, D).mul_(v1[:, :, None, a0:a1])
        outs.append(pv.sum(-2).view(B, H, D))  # [B, H, D]
        shifts.append(block_max)
    if len(outs) == 1:
        out, denom = outs[0], denoms[0]
    else:
        block_max = torch.cat(shifts, -1)  # [B, H, blocks]
        top = block_max.amax(-1, keepdim=True)
        top = finite_or_zero(top)
        weight = torch.exp(block_max - top)  # 0 for blocks without an allowed pair
        denom = (torch.cat(denoms, -1) * weight).sum(-1, keepdim=True)  # [B, H, 1]
        out = (torch.stack(outs, -2) * weight[..., None]).sum(-2)  # [B, H, D]
    # Normalise the D outputs, not the i^2 probabilities; no allowed pair at all (a pad query) gives 0, not NaN.
    return (out / torch.where(denom > 0, denom, torch.ones_like(denom)))[:, :, None]


def positioned_tensor_attention(q, k1, k2, v1, v2, *, scale, positions, w1=None, w2=None, attention_mask=None):
    """Tensor attention of queries at `positions` of a preallocated buffer, in shapes that do not depend on them.

    q is [B, H, Tq, D]; the streams [B, H_kv, L, D] are a buffer of L tokens written up to the last query (entries
    after it are unused); `positions` [Tq] are the queries' token positions. Query t uses the pairs (a, b) with
    a, b <= positions[t], inside the windows (a > positions[t] - w1, b > positions[t] - w2) and allowed by
    `attention_mask`: [B, L] (padding) or [B, Tq, L] (per query: a 4D custom mask). A pair is allowed when each of
    its tokens is, so the pair mask is the product of two token masks. Nothing reads the positions' values on the
    host, so a compiled graph holds every decode step of a static cache (`cache.static`). A windowed stream's w
    tokens are gathered per query; an unwindowed one spans the whole buffer: O(Tq n1 n2) scores per head, n = w or
    L, the price of the fixed shapes. Equals `naive_tensor_attention` on the buffer cut after the last query;
    differentiable (plain ops), which the 4D-mask path uses.
    """
    B, H, Tq, D = q.shape
    L = k1.shape[2]
    groups = H // k1.shape[1]
    dtype = q.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k1, k2, v1, v2 = (t.to(compute) for t in (q, k1, k2, v1, v2))
    k1, k2, v1, v2 = (repeat_kv(t, groups) for t in (k1, k2, v1, v2))
    last = positions.to(q.device)[:, None]  # [Tq, 1]
    mask = None if attention_mask is None else attention_mask.to(device=q.device, dtype=torch.bool)
    streams = []
    for k, v, w in ((k1, v1, w1), (k2, v2, w2)):
        if w is not None and w < L:
            # A window's w tokens, gathered per query: O(w) rows whatever L is (negative indices are masked).
            idx = last - w + 1 + torch.arange(w, device=q.device)  # [Tq, w]
            token, idx = idx >= 0, idx.clamp(min=0)
            k, v = k[:, :, idx], v[:, :, idx]  # [B, H, Tq, w, D]
        else:
            idx = torch.arange(L, device=q.device)[None]  # [1, L], shared by the queries
            token = idx <= last  # [Tq, L]
            k, v = k[:, :, None], v[:, :, None]  # [B, H, 1, L, D]
        if mask is not None:
            token = token & (mask[:, idx] if mask.dim() == 2 else mask.gather(2, idx.expand(B, Tq, -1)))
        token = (token if token.dim() == 3 else token[None])[:, None]  # [B or 1, 1, Tq, n]
        streams.append((k, v, token))
    (k1, v1, allowed1), (k2, v2, allowed2) = streams
    scores = torch.matmul(k1 * (q * scale)[:, :, :, None], k2.transpose(-1, -2))  # [B, H, Tq, n1, n2]
    pair_allowed = allowed1[..., :, None] & allowed2[..., None, :]  # [B or 1, 1, Tq, n1, n2]
    probs = masked_softmax(scores.flatten(-2), pair_allowed.flatten(-2)).view_as(scores)
    # Tokens a query may not use weigh 0, but 0 * NaN is NaN: their values are zeroed for that query.
    v1 = torch.where(allowed1[..., None], v1, 0)  # [B, H, Tq, n1, D]
    v2 = torch.where(allowed2[..., None], v2, 0)
    return (torch.matmul(probs, v2) * v1).sum(-2).to(dtype)


def pair_rows_attention(q, pair_keys, pair_values, *, scale, allowed=None):
    """Attention of q over explicit pair rows, the two-matrix layout's `Ṽᵀ softmax(K̃ q)` (paper Def. 3.8).

    q is [B, H, Tq, D]; pair_keys / pair_values are [B, H_kv, P, D] with row p = k1_a ⊙ k2_b / v1_a ⊙ v2_b of some
    pair (a, b), H_kv dividing H. `allowed` is None (every row for every query) or a bool mask broadcastable to
    [B, 1, Tq, P] (the same for every head). The softmax runs over all P rows jointly; a query with no allowed row
    gets zeros. A non-finite value row makes exactly the entries of the queries that may use it non-finite
    (`common.nonfinite_outputs`). Returns [B, H, Tq, D]. The query heads of a group are folded into rows of their
    key/value head (`fold_groups`), so the pair rows are never repeated.
    """
    B, H, Tq, _ = q.shape
    H_kv = pair_keys.shape[1]
    if H_kv != H:
        if allowed is not None:
            allowed = allowed.expand(*allowed.shape[:2], Tq, allowed.shape[-1]).repeat(1, 1, H // H_kv, 1)
        return unfold_groups(pair_rows_attention(fold_groups(q, H_kv), pair_keys, pair_values, scale=scale,
                                                 allowed=allowed), H)
    dtype = q.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    scores = torch.matmul(q * scale, pair_keys.transpose(-1, -2)).to(compute)  # [B, H, Tq, P]
    probs = masked_softmax(scores, allowed)
    out = torch.matmul(probs.to(pair_values.dtype), pair_values)  # [B, H, Tq, D]
    if allowed is not None and not all_finite(out):
        # A pair a query may not use weighs 0, but 0 * NaN is NaN: zero the non-finite rows in the product, then
        # mark the entries of the queries that may use them (a value spoils only its own component). Only outputs
        # with a non-finite entry pay for this pass over the rows.
        bad = ~torch.isfinite(pair_values)  # [B, H, P, D]
        used = torch.matmul(allowed.to(probs.dtype), bad.to(probs.dtype)) > 0  # [B, H, Tq, D]
        out = torch.matmul(probs.to(pair_values.dtype), pair_values.masked_fill(bad, 0))
        out = out.masked_fill(used, float("nan"))
    return out.to(dtype)
