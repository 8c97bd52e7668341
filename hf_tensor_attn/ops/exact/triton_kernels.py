"""Triton kernels of exact tensor attention: forward, backward (five gradients) and the four-cache decode step.

Same conventions and results as `naive.naive_tensor_attention` (see `ops.common`). Inputs fp16/bf16/fp32; every
dot product accumulates in fp32 and fp32 inputs use IEEE (not TF32) dot products.

Forward: one program per (block of queries t, batch*head). It walks the row stream (k1, v1) one key a at a time and
the column stream (k2, v2) in tiles of keys b: with qk = q_t * k1_a (one row of k1 times the block's queries), a
pair tile's scores are one dot [queries, d] @ [d, keys b], and its values a second one, P @ (v1_a * v2_b), into the
running output. This is the shape of Roy et al.'s kernel (FBGEMM's simplicial attention): every tile is 2-D, so
Triton keeps dot operands and accumulators in one layout each. (A first version put the rows (t, a) of a block of
queries and a block of row keys into one operand and reduced over a with 3-D reshapes; compiled for sm_80 and
sm_90 in a one-off sweep, Triton replicated such operands in every warp, each of the four kernels spilled
registers as shipped, and the dq kernel at every tile size tried. scripts/bench/triton_resources.py reads
registers, spills and shared memory of the current kernels from their binaries.) The products q_t * k1_a and, in
the backward, do_t * v1_a are rounded to the input dtype, as dot operands are; for bf16 and fp32 so are v1_a * v2_b
(forward) and k1_a * k2_b (dq), which then enter one accumulating dot (FOLD), while fp16, whose range such a
product may leave, multiplies v1_a (k1_a) into the dot's fp32 result instead. The softmax over pairs is an online
softmax (running max and sum per query, in base 2: the scale times log2(e) is folded into qk). The log-sum-exp is
saved.

Backward recomputes P from the log-sum-exp. dq is owned by query blocks (the forward's loops). The column
stream's gradients are owned by tiles of keys b, which loop over the blocks of queries that can see them and the
row keys those queries use; because the maths is symmetric in the two streams (<q, k1*k2> = <q, k2*k1>, v1*v2 =
v2*v1), the same kernel with the streams (and windows) swapped gives the row stream's gradients. No atomics: the
gradients are deterministic.

Grouped key/value heads (H_kv < H) are read in place: query head h uses key/value head h // (H / H_kv), so nothing
is repeated per call; the column stream's gradients are written per query head and summed over each group.

Decode: one program per (block of rows a, batch*head) computes an online softmax over all its pairs (a, b) and a
partial output; the partials of a head are merged by their maxima afterwards (split-K, as in flash decoding).

Masks: a pair (a, b) is allowed for query t iff a is (a <= t, t - a < w1, a real) and b is (same with w2), so a
tile's mask is a row condition and a column condition. A window of None is passed as Tk + 1 (excludes nothing).

Tile sizes, warps and pipeline stages per kernel are in `TILES`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One kernel's launch: `rows` queries per program (forward, dq), per step over queries (col) or row keys per
    program (decode); `cols` column-stream keys per tile (forward, dq, decode) or per program (col); warps and
    software-pipeline stages per program."""

    rows: int
    cols: int
    num_warps: int
    num_stages: int


KERNELS = ("forward", "dq", "col", "decode")
# (kernel, dtype, head-dim bucket) -> Tiles. bf16 and fp16 dot products run on tensor cores; fp32 ones with IEEE
# products, without them, so fp32 takes smaller tiles; fp16 keeps v1_a (k1_a in dq) out of its dot operands (FOLD),
# which costs registers. Bucket: 64 for d <= 64, 128 for 64 < d <= 128 (larger d uses 128's tiles and spills; no
# model here has one). Picked from what the compiler reports, not from timings (no GPU was available): each is the
# first of scripts/bench/triton_resources.py's candidates that compiles for sm_80 and sm_90 without spilling
# registers and within 99 KiB of shared memory with each triton release of triton_resources.RELEASES (3.6.0 to
# 3.9.0: each compiles them differently; docs/triton_resources/triton-*/tables.md; tests/ops/test_triton_compile.py
# compiles them again with the installed one).
TILES = {
    ("forward", "bf16", 64): Tiles(64, 32, 4, 3),
    ("forward", "bf16", 128): Tiles(64, 32, 8, 3),
    ("forward", "fp16", 64): Tiles(64, 32, 4, 3),
    ("forward", "fp16", 128): Tiles(64, 32, 8, 3),
    ("forward", "fp32", 64): Tiles(32, 32, 8, 3),
    ("forward", "fp32", 128): Tiles(32, 16, 8, 3),
    ("dq", "bf16", 64): Tiles(64, 32, 4, 3),
    ("dq", "bf16", 128): Tiles(64, 32, 8, 3),
    ("dq", "fp16", 64): Tiles(64, 32, 4, 3),
    ("dq", "fp16", 128): Tiles(64, 32, 8, 3),
    ("dq", "fp32", 64): Tiles(64, 32, 8, 3),
    ("dq", "fp32", 128): Tiles(32, 16, 8, 3),
    ("col", "bf16", 64): Tiles(32, 64, 4, 3),
    ("col", "bf16", 128): Tiles(32, 32, 8, 3),
    ("col", "fp16", 64): Tiles(32, 64, 4, 3),
    ("col", "fp16", 128): Tiles(32, 32, 8, 3),
    ("col", "fp32", 64): Tiles(16, 32, 8, 3),
    ("col", "fp32", 128): Tiles(16, 16, 8, 3),
    ("decode", "bf16", 64): Tiles(64, 64, 4, 3),
    ("decode", "bf16", 128): Tiles(64, 64, 8, 2),
    ("decode", "fp16", 64): Tiles(64, 64, 4, 3),
    ("decode", "fp16", 128): Tiles(64, 64, 8, 2),
    ("decode", "fp32", 64): Tiles(64, 32, 8, 3),
    ("decode", "fp32", 128): Tiles(32, 32, 8, 3),
}


@triton.jit
def _load_rows(ptr, rows, valid_rows, offs_d, d_valid, stride_t):
    """[len(rows), BLOCK_D] tile of rows `rows` in the stored dtype (zeros outside the valid rows and the head dim)."""
    mask = valid_rows[:, None] & d_valid[None, :]
    return tl.load(ptr + rows[:, None] * stride_t + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _load_row(ptr, row, offs_d, d_valid, stride_t):
    """[BLOCK_D] fp32 row `row` (one key; always a valid position)."""
    return tl.load(ptr + row * stride_t + offs_d, mask=d_valid, other=0.0).to(tl.float32)


@triton.jit
def _key_ok(keys, t, window, mask_ptr, n_keys, HAS_MASK: tl.constexpr):
    """Key positions `keys` usable by queries at absolute positions `t` (broadcast shapes); the padding mask is
    read only inside [0, n_keys) (a tile's last keys may lie past the end)."""
    ok = (keys <= t) & (t - keys < window) & (keys >= 0)
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + keys, mask=(keys >= 0) & (keys < n_keys), other=0) != 0)
    return ok


@triton.jit
def _forward_kernel(
    Q, K1, K2, V1, V2, MASK, O, LSE,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t,
    H, GROUPS, Tq, Tk, W1, W2, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_B: tl.constexpr,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr, FOLD: tl.constexpr,
):
    """O [BH, Tq, D] and LSE [BH, Tq] (base 2) of one block of queries."""
    pid_q, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: pid_bh * Tq * D passes 2**31
    b_idx, h_idx = pid_bh // H, pid_bh % H
    offset = Tk - Tq  # query i sits at absolute position i + offset
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_valid = offs_q < Tq
    t = offs_q + offset  # [BQ] absolute positions
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    kbase = b_idx * sk_b + (h_idx // GROUPS) * sk_h  # a group of GROUPS query heads shares a key/value head
    mask_ptr = MASK + b_idx * Tk
    dtype = K2.dtype.element_ty
    q = _load_rows(Q + b_idx * sq_b + h_idx * sq_h, offs_q, q_valid, offs_d, d_valid, sq_t)  # [BQ, BD]

    t_first = pid_q * BLOCK_Q + offset
    t_end = tl.minimum(t_first + BLOCK_Q, Tk)  # one past the block's last query
    b_start = tl.maximum(t_first - W2 + 1, 0)
    # Running max of the base-2 scores from a finite start: on a row whose tiles are all masked, alpha is then
    # exp2(start - start) = 1 instead of exp2(-inf + inf) = NaN.
    m = tl.full([BLOCK_Q], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_Q], tl.float32)  # running sum of exp2(s - m)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for a in range(tl.maximum(t_first - W1 + 1, 0), t_end):
        k1 = _load_row(K1 + kbase, a, offs_d, d_valid, sk_t)  # [BD]
        v1 = _load_row(V1 + kbase, a, offs_d, d_valid, sk_t)
        a_ok = _key_ok(a, t, W1, mask_ptr, Tk, HAS_MASK)  # [BQ]
        # q stays in its dtype across the loop (an fp32 copy would cost registers); the scale goes on the row
        qk = (q.to(tl.float32) * (k1 * qk_scale)[None, :]).to(dtype).to(DOT)  # [BQ, BD]: q_t * k1_a
        for b0 in range(b_start, t_end, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            b_in = offs_b < t_end
            k2 = _load_rows(K2 + kbase, offs_b, b_in, offs_d, d_valid, sk_t).to(DOT)  # [BB, BD]
            v2 = _load_rows(V2 + kbase, offs_b, b_in, offs_d, d_valid, sk_t)
            ok = a_ok[:, None] & _key_ok(offs_b[None, :], t[:, None], W2, mask_ptr, Tk, HAS_MASK) & b_in[None, :]
            s = tl.where(ok, tl.dot(qk, tl.trans(k2), input_precision=PRECISION), float("-inf"))  # [BQ, BB]
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            if FOLD:  # rows v1_a * v2_b, rounded like qk's q_t * k1_a: one dot accumulating into acc
                v12 = (v2.to(tl.float32) * v1[None, :]).to(dtype).to(DOT)
                acc = tl.dot(p.to(dtype).to(DOT), v12, acc * alpha[:, None], input_precision=PRECISION)
            else:  # fp16, whose range v1_a * v2_b may leave: v1_a multiplies the dot's fp32 result
                pv = tl.dot(p.to(dtype).to(DOT), v2.to(DOT), input_precision=PRECISION)
                acc = acc * alpha[:, None] + pv * v1[None, :]
            m = m_new
    has_pair = l > 0
    out = acc / tl.where(has_pair, l, 1.0)[:, None]  # no allowed pair (a pad query): 0, not NaN
    lse = tl.where(has_pair, m + tl.log2(tl.where(has_pair, l, 1.0)), 0.0)  # with s = -inf there, P = 0 anyway
    o_ptr = O + pid_bh * Tq * D + offs_q[:, None] * D + offs_d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=q_valid[:, None] & d_valid[None, :])
    tl.store(LSE + pid_bh * Tq + offs_q, lse, mask=q_valid)


@triton.jit
def _backward_dq_kernel(
    Q, K1, K2, V1, V2, MASK, DO, LSE, DELTA, DQ,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t,
    H, GROUPS, Tq, Tk, W1, W2, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_B: tl.constexpr,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr, FOLD: tl.constexpr,
):
    """dq_t / scale = sum_ab dS_t(a, b) k1_a * k2_b with dS = P * (dP - delta), dP = <do_t, v1_a * v2_b>.
    DO (dout's dtype) and DQ (fp32) are contiguous [BH, Tq, D]; LSE (base 2) and DELTA are [BH, Tq]."""
    pid_q, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: pid_bh * Tq * D passes 2**31
    b_idx, h_idx = pid_bh // H, pid_bh % H
    offset = Tk - Tq
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_valid = offs_q < Tq
    t = offs_q + offset
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    kbase = b_idx * sk_b + (h_idx // GROUPS) * sk_h  # a group of GROUPS query heads shares a key/value head
    mask_ptr = MASK + b_idx * Tk
    dtype = K2.dtype.element_ty
    q = _load_rows(Q + b_idx * sq_b + h_idx * sq_h, offs_q, q_valid, offs_d, d_valid, sq_t)
    do = _load_rows(DO + pid_bh * Tq * D, offs_q, q_valid, offs_d, d_valid, D)
    lse = tl.load(LSE + pid_bh * Tq + offs_q, mask=q_valid, other=0.0)
    delta = tl.load(DELTA + pid_bh * Tq + offs_q, mask=q_valid, other=0.0)

    t_first = pid_q * BLOCK_Q + offset
    t_end = tl.minimum(t_first + BLOCK_Q, Tk)
    b_start = tl.maximum(t_first - W2 + 1, 0)
    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for a in range(tl.maximum(t_first - W1 + 1, 0), t_end):
        k1 = _load_row(K1 + kbase, a, offs_d, d_valid, sk_t)
        v1 = _load_row(V1 + kbase, a, offs_d, d_valid, sk_t)
        a_ok = _key_ok(a, t, W1, mask_ptr, Tk, HAS_MASK)
        qk = (q.to(tl.float32) * (k1 * qk_scale)[None, :]).to(dtype).to(DOT)  # see the forward
        dov = (do.to(tl.float32) * v1[None, :]).to(dtype).to(DOT)  # dP = dov @ v2^T
        for b0 in range(b_start, t_end, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            b_in = offs_b < t_end
            k2 = _load_rows(K2 + kbase, offs_b, b_in, offs_d, d_valid, sk_t).to(DOT)
            v2 = _load_rows(V2 + kbase, offs_b, b_in, offs_d, d_valid, sk_t).to(DOT)
            ok = a_ok[:, None] & _key_ok(offs_b[None, :], t[:, None], W2, mask_ptr, Tk, HAS_MASK) & b_in[None, :]
            s = tl.dot(qk, tl.trans(k2), input_precision=PRECISION)
            p = tl.exp2(tl.where(ok, s, float("-inf")) - lse[:, None])
            dp = tl.dot(dov, tl.trans(v2), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            if FOLD:  # rows k1_a * k2_b (see the forward)
                k12 = (k2.to(tl.float32) * k1[None, :]).to(dtype).to(DOT)
                dq = tl.dot(ds.to(dtype).to(DOT), k12, dq, input_precision=PRECISION)
            else:
                dq += tl.dot(ds.to(dtype).to(DOT), k2, input_precision=PRECISION) * k1[None, :]
    dq_ptr = DQ + pid_bh * Tq * D + offs_q[:, None] * D + offs_d[None, :]
    tl.store(dq_ptr, dq, mask=q_valid[:, None] & d_valid[None, :])


@triton.jit
def _backward_col_kernel(
    Q, KR, KC, VR, VC, MASK, DO, LSE, DELTA, DKC, DVC,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t,
    H, GROUPS, Tq, Tk, W_ROW, W_COL, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_B: tl.constexpr,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
):
    """Gradients of the column stream (kc, vc) for one tile of its keys b, from the queries that can see them and
    the row keys a those queries use: dvc_b = sum_ta P (do_t * vr_a), dkc_b = scale * sum_ta dS (q_t * kr_a).
    DO is contiguous [BH, Tq, D]; DKC and DVC are contiguous [BH, Tk, D] (fp32)."""
    pid_b, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: pid_bh * Tk * D passes 2**31
    b_idx, h_idx = pid_bh // H, pid_bh % H
    offset = Tk - Tq
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_valid = offs_b < Tk
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    kbase = b_idx * sk_b + (h_idx // GROUPS) * sk_h  # a group of GROUPS query heads shares a key/value head
    mask_ptr = MASK + b_idx * Tk
    dtype = KC.dtype.element_ty
    kc = _load_rows(KC + kbase, offs_b, b_valid, offs_d, d_valid, sk_t).to(DOT)  # [BB, BD]
    vc = _load_rows(VC + kbase, offs_b, b_valid, offs_d, d_valid, sk_t).to(DOT)
    dkc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    dvc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)

    b_first = pid_b * BLOCK_B
    b_last = tl.minimum(b_first + BLOCK_B, Tk) - 1
    # the queries that may use a key of the tile: t >= b_first and t - b_last < W_COL
    i_start = tl.maximum(b_first, offset) - offset
    i_end = tl.minimum(b_last + W_COL, Tk) - offset
    for i0 in range(i_start, i_end, BLOCK_Q):
        offs_q = i0 + tl.arange(0, BLOCK_Q)
        q_valid = offs_q < i_end
        t = offs_q + offset
        q = _load_rows(Q + b_idx * sq_b + h_idx * sq_h, offs_q, q_valid, offs_d, d_valid, sq_t)
        do = _load_rows(DO + pid_bh * Tq * D, offs_q, q_valid, offs_d, d_valid, D)
        lse = tl.load(LSE + pid_bh * Tq + offs_q, mask=q_valid, other=0.0)
        delta = tl.load(DELTA + pid_bh * Tq + offs_q, mask=q_valid, other=0.0)
        b_ok = _key_ok(offs_b[:, None], t[None, :], W_COL, mask_ptr, Tk, HAS_MASK) & b_valid[:, None]  # [BB, BQ]
        b_ok = b_ok & q_valid[None, :]
        t_first = i0 + offset
        t_end = tl.minimum(t_first + BLOCK_Q, Tk)
        for a in range(tl.maximum(t_first - W_ROW + 1, 0), t_end):
            kr = _load_row(KR + kbase, a, offs_d, d_valid, sk_t)
            vr = _load_row(VR + kbase, a, offs_d, d_valid, sk_t)
            ok = b_ok & _key_ok(a, t, W_ROW, mask_ptr, Tk, HAS_MASK)[None, :]  # [BB, BQ]
            qk = (q.to(tl.float32) * (kr * qk_scale)[None, :]).to(dtype).to(DOT)  # [BQ, BD], see the forward
            dov = (do.to(tl.float32) * vr[None, :]).to(dtype).to(DOT)
            s = tl.where(ok, tl.dot(kc, tl.trans(qk), input_precision=PRECISION), float("-inf"))  # [BB, BQ]
            p = tl.exp2(s - lse[None, :])
            dp = tl.dot(vc, tl.trans(dov), input_precision=PRECISION)
            ds = p * (dp - delta[None, :])
            dvc = tl.dot(p.to(dtype).to(DOT), dov, dvc, input_precision=PRECISION)
            dkc = tl.dot(ds.to(dtype).to(DOT), qk, dkc, input_precision=PRECISION)
    store = b_valid[:, None] & d_valid[None, :]
    dk_ptr = DKC + pid_bh * Tk * D + offs_b[:, None] * D + offs_d[None, :]
    dv_ptr = DVC + pid_bh * Tk * D + offs_b[:, None] * D + offs_d[None, :]
    # qk held scale * log2(e) * q * kr: ln(2) = 1 / log2(e) leaves scale * q * kr
    tl.store(dk_ptr, dkc * 0.6931471805599453, mask=store)
    tl.store(dv_ptr, dvc, mask=store)


@triton.jit
def _decode_kernel(
    Q, K1, K2, V1, V2, MASK, M_OUT, L_OUT, ACC_OUT,
    sq_b, sq_h, sk_b, sk_h, sk_t,
    H, GROUPS, Tk, N1, N2, qk_scale, n_splits,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
):
    """Partial decode step over rows a of one block: the last N1 keys of stream 1 and the last N2 of stream 2.
    Writes the block's max (base 2), sum of exp2(s - max) and sum_ab exp2(s - max) v1_a * v2_b."""
    pid_a, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: offsets of large caches
    b_idx, h_idx = pid_bh // H, pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    kbase = b_idx * sk_b + (h_idx // GROUPS) * sk_h  # a group of GROUPS query heads shares a key/value head
    mask_ptr = MASK + b_idx * Tk
    dtype = K2.dtype.element_ty
    q = tl.load(Q + b_idx * sq_b + h_idx * sq_h + offs_d, mask=d_valid, other=0.0).to(tl.float32) * qk_scale
    rows = Tk - N1 + pid_a * BLOCK_A + tl.arange(0, BLOCK_A)  # absolute key positions a
    a_ok = rows < Tk
    if HAS_MASK:
        a_ok = a_ok & (tl.load(mask_ptr + rows, mask=a_ok, other=0) != 0)
    k1 = _load_rows(K1 + kbase, rows, rows < Tk, offs_d, d_valid, sk_t).to(tl.float32)
    v1 = _load_rows(V1 + kbase, rows, rows < Tk, offs_d, d_valid, sk_t).to(tl.float32)
    qk = (k1 * q[None, :]).to(dtype).to(DOT)  # [BA, BD]
    # Per row a an online softmax over b (as the forward's per query), merged over the rows at the end.
    m = tl.full([BLOCK_A], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_A], tl.float32)
    acc = tl.zeros([BLOCK_A, BLOCK_D], tl.float32)  # sum_b exp2(s - m_a) v2_b, per row a
    for b0 in range(Tk - N2, Tk, BLOCK_B):
        cols = b0 + tl.arange(0, BLOCK_B)
        b_ok = cols < Tk
        k2 = _load_rows(K2 + kbase, cols, b_ok, offs_d, d_valid, sk_t).to(DOT)
        v2 = _load_rows(V2 + kbase, cols, b_ok, offs_d, d_valid, sk_t).to(DOT)
        if HAS_MASK:
            b_ok = b_ok & (tl.load(mask_ptr + cols, mask=b_ok, other=0) != 0)
        s = tl.dot(qk, tl.trans(k2), input_precision=PRECISION)  # [BA, BB]
        s = tl.where(a_ok[:, None] & b_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype).to(DOT), v2, input_precision=PRECISION)
        m = m_new
    top = tl.max(m, 0)
    weight = tl.exp2(m - top)  # [BA]
    part = tl.sum(acc * v1 * weight[:, None], 0)  # [BD]: sum_a v1_a * (P @ V2)_a
    slot = pid_bh * n_splits + pid_a
    tl.store(M_OUT + slot, top)
    tl.store(L_OUT + slot, tl.sum(l * weight, 0))
    tl.store(ACC_OUT + slot * D + offs_d, part, mask=d_valid)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the setting is ignored for fp16/bf16 operands


def _window(w, Tk: int) -> int:
    return Tk + 1 if w is None else int(w)


def _key_strides(k1, k2, v1, v2):
    """(k1, k2, v1, v2, strides (b, h, t)) with unit stride along the head dim and one set of strides for all four
    (the cache's chunks of one buffer already share them; anything else is copied)."""
    streams = [t if t.stride(-1) == 1 else t.contiguous() for t in (k1, k2, v1, v2)]
    if len({t.stride() for t in streams}) > 1:
        streams = [t.contiguous() for t in streams]
    return (*streams, streams[0].stride()[:3])


def _rows_last_dim(q):
    return q if q.stride(-1) == 1 else q.contiguous()


def _mask_arg(attention_mask, q):
    if attention_mask is None:
        return q.new_zeros(1, dtype=torch.int8), False  # never read
    return attention_mask.to(device=q.device, dtype=torch.int8).contiguous(), True


def block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def tiles(kernel: str, dtype: torch.dtype, D: int) -> Tiles:
    """The launch of `kernel` (one of KERNELS) for inputs of `dtype` and head dim D (see TILES)."""
    return TILES[kernel, DTYPE_NAMES[dtype], 64 if D <= 64 else 128]


def _launch_constants(q, kernel: str, has_mask: bool, interpreted: bool | None) -> dict:
    """The kernel's compile-time constants and launch options for q's dtype and head dim. `interpreted`: whether the
    launch runs in Triton's interpreter; None means "q is not a CUDA tensor"."""
    D = q.shape[-1]
    interpreted = not q.is_cuda if interpreted is None else interpreted
    # Dot operands are rounded to the input dtype; the interpreter's tl.dot cannot multiply bf16/fp16 (numpy has
    # no bf16 matmul), so there the rounded operands go to tl.dot as fp32: the products of two bf16 numbers are
    # exact in fp32, as on tensor cores, so only the summation order differs from the GPU.
    dot = tl.float32 if interpreted else _TL_DTYPES[q.dtype]
    launch = tiles(kernel, q.dtype, D)
    rows = "BLOCK_A" if kernel == "decode" else "BLOCK_Q"
    constants = {"D": D, "BLOCK_D": block_d(D), "HAS_MASK": has_mask, "PRECISION": _precision(q.dtype), "DOT": dot,
                 rows: launch.rows, "BLOCK_B": launch.cols, "num_warps": launch.num_warps,
                 "num_stages": launch.num_stages}
    if kernel in ("forward", "dq"):
        constants["FOLD"] = q.dtype != torch.float16  # products of two fp16 numbers may leave fp16's range
    return constants


@dataclasses.dataclass
class Launch:
    """One kernel launch, built before it runs: scripts/bench/triton_resources.py compiles exactly these launches
    for GPUs this machine may not have."""

    name: str  # one of KERNELS
    kernel: object  # a triton.JITFunction
    grid: tuple
    args: tuple
    constants: dict  # compile-time constants and launch options

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constants)


def forward_launches(q, k1, k2, v1, v2, scale, w1, w2, attention_mask, interpreted=None):
    """([Launch], (out [B, H, Tq, D] in q's dtype, lse [B*H, Tq] fp32 in base 2)); the outputs are written when the
    launches run. k1, k2, v1, v2 may have H_kv heads. `interpreted`: see `_launch_constants`."""
    B, H, Tq, D = q.shape
    Tk = k1.shape[2]
    groups = H // k1.shape[1]
    q = _rows_last_dim(q)
    k1, k2, v1, v2, sk = _key_strides(k1, k2, v1, v2)
    mask, has_mask = _mask_arg(attention_mask, q)
    out = torch.empty(B, H, Tq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B * H, Tq, dtype=torch.float32, device=q.device)
    constants = _launch_constants(q, "forward", has_mask, interpreted)
    args = (q, k1, k2, v1, v2, mask, out, lse, q.stride(0), q.stride(1), q.stride(2), *sk,
            H, groups, Tq, Tk, _window(w1, Tk), _window(w2, Tk), scale * LOG2E)
    grid = (triton.cdiv(Tq, constants["BLOCK_Q"]), B * H)
    return [Launch("forward", _forward_kernel, grid, args, constants)], (out, lse)


def backward_launches(dout, q, k1, k2, v1, v2, out, lse, scale, w1, w2, attention_mask, interpreted=None):
    """([Launch], (dq, (dk1, dv1), (dk2, dv2))): fp32 gradients per query head ([B*H, T, D]), written when the
    launches run."""
    B, H, Tq, D = q.shape
    Tk = k1.shape[2]
    groups = H // k1.shape[1]
    q = _rows_last_dim(q)
    k1, k2, v1, v2, sk = _key_strides(k1, k2, v1, v2)
    mask, has_mask = _mask_arg(attention_mask, q)
    do = dout.reshape(B * H, Tq, D).contiguous()  # its own dtype: the kernels widen it to fp32 where they read it
    delta = (do.to(torch.float32) * out.to(torch.float32).reshape(B * H, Tq, D)).sum(-1).contiguous()  # <do_t, o_t>
    w1, w2 = _window(w1, Tk), _window(w2, Tk)
    strides = (q.stride(0), q.stride(1), q.stride(2), *sk)
    dq = torch.empty(B * H, Tq, D, dtype=torch.float32, device=q.device)
    constants = _launch_constants(q, "dq", has_mask, interpreted)
    args = (q, k1, k2, v1, v2, mask, do, lse, delta, dq, *strides, H, groups, Tq, Tk, w1, w2, scale * LOG2E)
    launches = [Launch("dq", _backward_dq_kernel, (triton.cdiv(Tq, constants["BLOCK_Q"]), B * H), args, constants)]
    grads = {}
    constants = _launch_constants(q, "col", has_mask, interpreted)
    # the column-stream kernel, once with k2/v2 as the column stream and once with the streams swapped
    for kr, kc, vr, vc, w_row, w_col, name in ((k1, k2, v1, v2, w1, w2, 2), (k2, k1, v2, v1, w2, w1, 1)):
        dk = torch.empty(B * H, Tk, D, dtype=torch.float32, device=q.device)
        dv = torch.empty_like(dk)
        args = (q, kr, kc, vr, vc, mask, do, lse, delta, dk, dv, *strides, H, groups, Tq, Tk, w_row, w_col,
                scale * LOG2E)
        grid = (triton.cdiv(Tk, constants["BLOCK_B"]), B * H)
        launches.append(Launch("col", _backward_col_kernel, grid, args, constants))
        grads[name] = (dk, dv)
    return launches, (dq, grads[1], grads[2])


def forward(q, k1, k2, v1, v2, scale, w1, w2, attention_mask):
    """(out [B, H, Tq, D] in q's dtype, lse [B*H, Tq] fp32 in base 2); k1, k2, v1, v2 may have H_kv heads."""
    launches, outputs = forward_launches(q, k1, k2, v1, v2, scale, w1, w2, attention_mask)
    for launch in launches:
        launch()
    return outputs


def backward(dout, q, k1, k2, v1, v2, out, lse, scale, w1, w2, attention_mask):
    """Gradients (dq, dk1, dk2, dv1, dv2), each shaped and typed like its input (k, v: [B, H_kv, Tk, D])."""
    B, H, Tq, D = q.shape
    H_kv, Tk = k1.shape[1], k1.shape[2]
    launches, (dq, (dk1, dv1), (dk2, dv2)) = backward_launches(dout, q, k1, k2, v1, v2, out, lse, scale, w1, w2,
                                                                attention_mask)
    for launch in launches:
        launch()
    # per query head: a group's key/value head gets the sum of its query heads' contributions
    grouped = lambda g, like: g.view(B, H_kv, H // H_kv, Tk, D).sum(2).to(like.dtype)  # noqa: E731
    return (dq.view(B, H, Tq, D).mul_(scale).to(q.dtype), grouped(dk1, k1), grouped(dk2, k2), grouped(dv1, v1),
            grouped(dv2, v2))


def decode_launches(q, k1, k2, v1, v2, scale, w1, w2, attention_mask, interpreted=None):
    """([Launch], (m, l, acc)): one decode position q [B, H, 1, D] over the cached [B, H_kv, Tk, D] streams, as
    per-block partials (max, sum, weighted values) written when the launch runs."""
    B, H, _, D = q.shape
    groups, Tk = H // k1.shape[1], k1.shape[2]
    n1 = Tk if w1 is None else min(w1, Tk)
    n2 = Tk if w2 is None else min(w2, Tk)
    q = _rows_last_dim(q)
    k1, k2, v1, v2, sk = _key_strides(k1, k2, v1, v2)
    mask, has_mask = _mask_arg(attention_mask, q)
    constants = _launch_constants(q, "decode", has_mask, interpreted)
    splits = triton.cdiv(n1, constants["BLOCK_A"])
    m = torch.empty(B * H, splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B * H, splits, D, dtype=torch.float32, device=q.device)
    args = (q, k1, k2, v1, v2, mask, m, l, acc, q.stride(0), q.stride(1), *sk, H, groups, Tk, n1, n2, scale * LOG2E,
            splits)
    return [Launch("decode", _decode_kernel, (splits, B * H), args, constants)], (m, l, acc)


def four_cache_decode(q, k1, k2, v1, v2, *, scale, w1=None, w2=None, attention_mask=None):
    """One decode position q [B, H, 1, D] over the cached [B, H_kv, Tk, D] streams (no autograd)."""
    B, H, _, D = q.shape
    launches, (m, l, acc) = decode_launches(q, k1, k2, v1, v2, scale, w1, w2, attention_mask)
    for launch in launches:
        launch()
    # Merge the blocks by their maxima; a head with no allowed pair anywhere has l = 0 and gets 0.
    weight = torch.exp2(m - m.amax(-1, keepdim=True))  # [BH, splits]
    total = (l * weight).sum(-1, keepdim=True)  # [BH, 1]
    out = (acc * weight[..., None]).sum(1) / torch.where(total > 0, total, torch.ones_like(total))
    return out.view(B, H, 1, D).to(q.dtype)
