"""Tiled tensor attention: exact, and never materialises the Tq x Tk x Tk scores (FlashAttention-style, CPU torch).

Forward: for each query block, tiles over (row-stream block x column-stream block). The scores of a tile are one
batched GEMM over all heads, stored transposed (column key major, see `tiles.Masker.apply`):
k_col [bc, d] @ (q * k_row)^T [d, bq*ba]; the values are a second one, P [bq*ba, bc] @ v_col [bc, d], times v_row
and summed over the row keys. The softmax over *pairs* runs against a
per-query reference score subtracted inside the first GEMM (see `_forward`), so a tile costs two GEMMs, one exp
pass and one row-sum pass. Backward saves only the inputs, the output and the per-query log-sum-exp, and
recomputes each tile: one GEMM gives S - lse and dP - D together, two more give the five gradients. Memory is
O(tile + T*d); a window (w1, w2) costs O(T * w1 * w2 * d).

The tile loops also exist compiled (`csrc/tiles.cpp`, built on first use by `ops.extension`): same tiles and GEMMs
(without the ones columns: one pass per tile subtracts the per-query shifts, clamps, exps and masks), no Python
between them. The attention door (`ops.dispatch`) hands them to `forward` / `backward` on CPU where they build; the
Python loops stay, tested beside them against the naive op, and run where they do not build or with
`HF_TENSOR_ATTN_CPU_EXTENSION=0`.

The maths is symmetric in the two streams (<q, k1*k2> = <q, k2*k1>, v1*v2 = v2*v1). The row stream reads each
query's own window exactly (see `tiles`), while a column block is shared by the query block and so spans
w + bq - 1 keys for a window w; the wider window therefore goes on the columns, where that widening costs least.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .tiles import Masker, QueryBlock, TileSizes, choose_tile_sizes, pack, plan
from ..common import EXP_FLOOR, EXP_HEADROOM


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Workspace:
    """Flat scratch buffers reused by every tile: a fresh multi-MB tensor per tile costs page faults."""

    def __init__(self, dtype, device):
        self.dtype, self.device = dtype, device
        self.buffers: dict[str, torch.Tensor] = {}
        self.views: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        view = self.views.get((name, shape))
        if view is None:
            n = math.prod(shape)
            buf = self.buffers.get(name)
            if buf is None or buf.numel() < n:
                buf = self.buffers[name] = torch.empty(n, dtype=self.dtype, device=self.device)
                self.views = {key: v for key, v in self.views.items() if key[0] != name}
            view = self.views[(name, shape)] = buf[:n].view(shape)
        return view


class _RowStream:
    """A row-stream tensor ([BH, Tk, d]) as tiles see it: without a window an aligned key block shared by the
    queries ([BH, 1, ba, d]); with a window w each query's own slice of offsets ([BH, bq, nj, d]), read from a
    strided view whose [t, j] is key t - w + 1 + j (zeros before key 0, masked anyway)."""

    def __init__(self, x: torch.Tensor, window: int | None):
        self.window = window
        if window is None:
            self.x = x
        else:
            BH, Tk, d = x.shape
            xp = torch.cat([x.new_zeros(BH, window - 1, d), x], 1)  # key a at a + window - 1
            self.x = xp.as_strided((BH, Tk, window, d), (xp.stride(0), d, d, 1))  # [BH, Tk, w, d]

    def tile(self, block: QueryBlock, rb) -> torch.Tensor:
        if self.window is None:
            return self.x[:, None, rb.start : rb.stop]
        return self.x[:, block.t0 : block.t1, rb.start : rb.stop]


class _RowGrad:
    """Accumulates the gradient of a row-stream tensor from per-(query, row) contributions products * factor
    ([BH, bq, n, d] times [BH, bq, 1, d])."""

    def __init__(self, BH: int, Tk: int, d: int, window: int | None, dtype, device):
        self.windowed = window is not None
        self.lead = 0 if window is None else window - 1
        self.g = torch.zeros(BH, self.lead + Tk, d, dtype=dtype, device=device)
        self.skewed: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, block: QueryBlock, rb, products: torch.Tensor, factor: torch.Tensor) -> None:
        BH, bq, n, d = products.shape
        if not self.windowed:
            self.g[:, rb.start : rb.stop] += (products * factor).sum(1)
            return
        # With a window, (t, j) holds key t - w + 1 + j, stored at t + j: key k gets the sum of the anti-diagonal
        # t + j = k. The contributions are written into a [bq, n + bq] buffer whose row t starts t columns in (a
        # strided view), so that a plain sum over t adds up the anti-diagonals: half the time of index_add_ over
        # bq * n rows. The view always covers the same entries: the rest of the buffer stays zero.
        entry = self.skewed.get((bq, n))
        if entry is None:
            buf = torch.zeros(BH, bq, n + bq, d, dtype=self.g.dtype, device=self.g.device)
            view = buf.as_strided((BH, bq, n, d), (bq * (n + bq) * d, (n + bq + 1) * d, d, 1))
            entry = self.skewed[(bq, n)] = (buf, view)
        buf, view = entry
        torch.mul(products, factor, out=view)
        start = block.t0 + rb.start
        self.g[:, start : start + n + bq - 1] += buf.sum(1)[:, : n + bq - 1]  # its last column is never written

    def result(self) -> torch.Tensor:
        return self.g[:, self.lead :]


@dataclass
class _Problem:
    """One call's inputs as both passes see them: [BH, T, d] tensors in the compute dtype, q pre-scaled, the two
    key/value streams ordered as rows (the narrower window) and columns."""

    q: torch.Tensor
    k_row: torch.Tensor
    k_col: torch.Tensor
    v_row: torch.Tensor
    v_col: torch.Tensor
    w_row: int | None
    w_col: int | None
    mask: torch.Tensor | None  # [B, Tk] bool: real tokens
    batch: int
    heads: int
    sizes: TileSizes

    def unpack(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d+1] with a last column of ones."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)


def _reference_scores(q, kr, kc, w_row, w_col, mask, B, H):
    """([BH, Tq] score s_t(c, c) of the latest real key c <= t, [BH, Tq] bool: query t has an allowed pair).

    If t has any allowed pair (a, b), the narrower window holds a real key, hence c, and (c, c) is allowed.
    A query with no allowed pair gets some finite value.
    """
    BH, Tq, d = q.shape
    Tk = kr.shape[1]
    pos = torch.arange(Tk - Tq, Tk, device=q.device)
    if mask is None:  # c = t: the queries' own keys, a slice (no gather)
        m = (q * kr[:, Tk - Tq :]).mul_(kc[:, Tk - Tq :]).sum(-1)
        return m, torch.ones(BH, Tq, dtype=torch.bool, device=q.device)
    keys = torch.arange(Tk, device=q.device).expand(B, Tk)
    latest = torch.where(mask, keys, -1).cummax(dim=1).values[:, Tk - Tq :]  # [B, Tq], -1: no real key yet
    narrow = w_row if w_row is not None else w_col  # the row stream has the narrower window
    has_pair = latest >= 0
    if narrow is not None:
        has_pair = has_pair & (pos - latest < narrow)
    index = latest.clamp_min(0).repeat_interleave(H, dim=0)[:, :, None].expand(BH, Tq, d)  # [BH, Tq, d]
    m = (q * kr.gather(1, index)).mul_(kc.gather(1, index)).sum(-1)
    return m, has_pair.repeat_interleave(H, dim=0)


def _score_bounds(q, kr, kc, Tk: int) -> tuple[torch.Tensor, bool]:
    """([BH, Tq] bound on |s_t(a, b)| over every key pair a, b <= t, whether every score of the call is finite).

    By Cauchy-Schwarz twice, |<q_t * kr_a, kc_b>| <= ||q_t * kr_a||_2 ||kc_b||_2 <= ||q_t||_4 ||kr_a||_4 ||kc_b||_2,
    with running maxima over the keys. Later keys only enter tiles of query t masked, so the per-query bound skips
    them; the flag bounds them too (maxima over all keys), leaving room for the reference score or log-sum-exp of
    the same size that the tiles subtract. Partial sums of the GEMMs obey the same bound."""
    Tq = q.shape[1]
    q4, kr4, kc2 = _norm4(q), _norm4(kr), torch.linalg.vector_norm(kc, ord=2, dim=-1)
    bound = q4 * kr4.cummax(1).values[:, Tk - Tq :] * kc2.cummax(1).values[:, Tk - Tq :]
    overall = float(q4.amax() * kr4.amax() * kc2.amax()) if bound.numel() else 0.0
    return bound, overall < torch.finfo(q.dtype).max / 4  # False for inf and NaN too


def _norm4(x: torch.Tensor) -> torch.Tensor:
    """The 4-norm over the last dim as the square root of the 2-norm of the squares: vector_norm(ord=4) takes a
    generic pow path on CPU that cost more than a forward's tile loop at small windows. Overflow (|x| > ~1e9 in
    fp32) gives an infinite bound, which only switches a block to the checked path."""
    return torch.linalg.vector_norm(x.square(), dim=-1).sqrt_()


def _block_flags(flags: torch.Tensor, blocks) -> list[bool]:
    """Per query block: does any query (of any head) of the block raise the [BH, Tq] flag?"""
    per_query = flags.any(0).tolist()
    return [any(per_query[block.start : block.stop]) for block in blocks]


def _forward(p: _Problem, compiled):
    """Returns out [BH, Tq, d], lse [BH, Tq] and has_pair [BH, Tq] (the query has an allowed pair).

    Each query t carries a reference m_t subtracted from its scores (in the Python loops inside the score GEMM,
    where a ones column in kc meets -m_t; in the compiled ones by their exp pass), and the tile holds exp(s - m_t)
    once exp is applied. m_t starts at the score of an allowed pair (see
    `_reference_scores`), so sum_ab exp(s - m_t) >= 1 and nothing that matters underflows. Cauchy-Schwarz
    bounds every score of a query block, |s| <= ||q_t * kr_a|| * ||kc_b||: while s - m_t stays under the headroom
    exp cannot overflow, and while it stays over the floor nothing needs clamping. Only when the bound is too
    loose does a tile pay for its max (amax), and m_t moves only when a score really exceeds m_t + headroom.
    Without the bound every tile would need two more passes (max, subtract) and a rescale of the accumulators.
    The compiled loop skips the bound: its exp pass compares every allowed s - m_t with the headroom itself.
    """
    q, kr, kc, vr, vc, w_row, w_col, mask, B, H, sizes = p.unpack()
    Tk = kr.shape[1]
    headroom, floor = EXP_HEADROOM[q.dtype], EXP_FLOOR[q.dtype]
    m_all, has_pair = _reference_scores(q, kr, kc, w_row, w_col, mask, B, H)  # [BH, Tq] each, m_all updated
    blocks = plan(q.shape[1], Tk, w_row, w_col, mask, sizes)
    # The compiled loop has no max pass: it needs every allowed score under m_t + headroom. Its exp pass subtracts
    # m_t, clamps at the floor and zeroes masked entries (they may be infinite) in one go, and reports an allowed
    # score over m_t + headroom, after which the Python loops below run (only for scores far beyond the usual).
    if compiled is not None:
        num, l_all, over = compiled.forward_tiles(
            *(t.contiguous() for t in (q, m_all, kr, kc, vr, vc)), w_row or 0, w_col or 0, *pack(blocks), _pad(mask),
            H, floor, headroom,
        )
    if compiled is None or over:
        bound, finite_scores = _score_bounds(q, kr, kc, Tk)  # [BH, Tq], bool
        checked_blocks = _block_flags(bound - m_all > headroom, blocks)
        clamped_blocks = _block_flags(bound + m_all > -floor, blocks)
        num, l_all = _python_tiles(p, m_all, blocks, checked_blocks, clamped_blocks, finite_scores)
    out, lse = num.div_(l_all[:, :, None]), l_all.log_().add_(m_all)
    if not bool(has_pair.all()):  # queries without a pair (all padding, or windows before the first real key)
        out, lse = torch.where(has_pair[:, :, None], out, 0), torch.where(has_pair, lse, 0)
    return out, lse, has_pair


def _pad(mask: torch.Tensor | None) -> torch.Tensor:
    """The compiled loops' padding argument: [B, Tk] bool, True at padding; empty without a mask."""
    return (~mask).contiguous() if mask is not None else torch.empty(0, dtype=torch.bool)


def _python_tiles(p: _Problem, m_all, blocks, checked_blocks, clamped_blocks, finite_scores):
    """(num [BH, Tq, d] = sum_ab exp(s - m_t) v1_a * v2_b, l [BH, Tq] = sum_ab exp(s - m_t)); m_all moves where a
    checked block finds a score over the headroom."""
    q, kr, kc, vr, vc, w_row, w_col, mask, B, H, sizes = p.unpack()
    # Rows (t, a) of the score GEMM are [q_t, -m_t] * [kr_a, 1] = [q_t * kr_a, -m_t]: one multiply writes them whole
    # (writing q_t * kr_a into the first d of d+1 columns would be a slower, strided pass), and the GEMM subtracts m_t.
    q_aug = torch.cat([q, -m_all[:, :, None]], -1)  # [BH, Tq, d+1]
    BH, Tq, d = q.shape
    Tk = kr.shape[1]
    dtype, device = q.dtype, q.device
    ws = _Workspace(dtype, device)
    headroom, floor = EXP_HEADROOM[dtype], EXP_FLOOR[dtype]
    kc1 = _with_ones(kc)  # rows [kc_b, 1]
    l_all = torch.zeros(BH, Tq, dtype=dtype, device=device)  # sum_ab exp(s - m_t)
    num = torch.zeros(BH, Tq, d, dtype=dtype, device=device)  # sum_ab exp(s - m_t) v1_a * v2_b
    masker = Masker(w_row, w_col, mask, Tk, device, floor, dtype, finite_scores)
    kr_rows, vr_rows = _RowStream(_with_ones(kr), w_row), _RowStream(vr, w_row)
    for block, checked, clamp in zip(blocks, checked_blocks, clamped_blocks):
        bq = block.stop - block.start
        qa = q_aug[:, block.start : block.stop]  # [BH, bq, d+1]
        m = m_all[:, block.start : block.stop]  # [BH, bq], views: updated in place
        l = l_all[:, block.start : block.stop]
        # sum_b P vc_b * vr_a accumulated per (t, a) over the whole block; summed over a once at the end
        acc = ws.get("acc", BH, bq, max(rb.stop - rb.start for rb in block.row_blocks), d)
        if len(block.row_blocks) > 1:
            acc.zero_()
        cols = [
            (cb.stop - cb.start, kc1[:, cb.start : cb.stop], vc[:, cb.start : cb.stop], masker.col_runs(block, cb))
            for cb in block.col_blocks
        ]
        for rb in block.row_blocks:
            ba = rb.stop - rb.start
            row_runs = masker.row_runs(block, rb)
            qk = ws.get("qk", BH, bq, ba, d + 1)  # rows (t, a): [q_t * kr_a, -m_t]
            torch.mul(qa[:, :, None, :], kr_rows.tile(block, rb), out=qk)
            qk_cols = qk.view(BH, bq * ba, d + 1).transpose(1, 2)  # [BH, d+1, bq*ba]
            # P @ vc summed over the column blocks first: the product with vr and the sum over a, a pass over
            # [bq, ba, d], then happens once per row block instead of once per tile.
            pv = ws.get("pv", BH, bq * ba, d)
            for ci, (bc, kc_tile, vc_tile, col_runs) in enumerate(cols):
                # (s - m) transposed, [BH, bc, bq*ba]: see `Masker.apply` for why the tile is column-major
                s = torch.bmm(kc_tile, qk_cols, out=ws.get("s", BH, bc, bq * ba))
                if row_runs or col_runs:
                    masker.apply(s.view(B, H, bc, bq, ba), row_runs, col_runs)
                s_t = s.view(BH, bc, bq, ba)  # pairs (b, a) of query t: s_t[:, :, t]
                if checked:
                    over = s_t.amax((1, 3))  # [BH, bq]
                    shift = torch.where(over > headroom, over, 0)
                    if bool(shift.any()):
                        s_t.sub_(shift[:, None, :, None])
                        m += shift
                        alpha = torch.exp(-shift)
                        l.mul_(alpha)
                        acc.mul_(alpha[:, :, None, None])
                        pv.view(BH, bq, ba * d).mul_(alpha[:, :, None])
                        qa[..., d] = -m
                        qk[..., d] = -m[:, :, None]
                        clamp = True
                if clamp:
                    s.clamp_min_(floor)
                # Sum over b first (contiguous rows of the tile), then over a on a [BH, bq, ba] remainder.
                l.add_(s.exp_().sum(1).view(BH, bq, ba).sum(-1))
                if ci == 0:
                    torch.bmm(s.transpose(1, 2), vc_tile, out=pv)  # [BH, bq*ba, d]
                else:
                    pv.baddbmm_(s.transpose(1, 2), vc_tile)
            if len(block.row_blocks) == 1:  # the usual windowed block: write instead of zeroing and accumulating
                torch.mul(pv.view(BH, bq, ba, d), vr_rows.tile(block, rb), out=acc)
            else:
                acc[:, :, :ba].addcmul_(pv.view(BH, bq, ba, d), vr_rows.tile(block, rb))
        torch.sum(acc, 2, out=num[:, block.start : block.stop])
    return num, l_all


def _backward(p: _Problem, out, lse, has_pair, dout, compiled):
    """Gradients w.r.t. the pre-scaled q, k_row, k_col, v_row, v_col (all [BH, T, d]).

    Per tile: [S - lse; dP - D] = [q*kr, -lse; dO*vr, -D] @ [kc, 1; vc, 1]^T in one GEMM, P = exp(S - lse),
    dS = P * (dP - D); then [P @ vc; dS @ kc] (for dvr, dkr and dq) and [P^T @ (dO*vr); dS^T @ (q*kr)] (dvc, dkc).
    (The compiled loops compute the same products from the plain streams and subtract lse and D in their exp pass.)
    """
    q, kr, kc, vr, vc, w_row, w_col, mask, B, H, sizes = p.unpack()
    BH, Tq, d = q.shape
    Tk = kr.shape[1]
    dtype, device = q.dtype, q.device
    floor = EXP_FLOOR[dtype]
    # A query without allowed pairs has output 0 whatever its inputs; its clamped tiles are not exactly 0, so
    # its output gradient is dropped instead.
    dout = dout * has_pair[:, :, None]
    delta = (dout * out).sum(-1)  # [BH, Tq]: D_t = sum_ab P dP = <dO_t, o_t>
    blocks = plan(Tq, Tk, w_row, w_col, mask, sizes)
    # The backward's scores are S - lse <= 0 for every allowed pair: the compiled loop needs no bound here. Its exp
    # pass subtracts lse_t and D_t, so its GEMM operands are the plain streams.
    if compiled is not None:
        dq, dkr, dkc, dvr, dvc = compiled.backward_tiles(
            *(t.contiguous() for t in (q, dout, lse, delta, kr, vr, kc, vc)), w_row or 0, w_col or 0, *pack(blocks),
            _pad(mask), H, floor,
        )
        return dq, dkr, dkc, dvr, dvc
    # s - lse >= -bound - lse: clamp only blocks where that may fall under the floor
    bound, finite_scores = _score_bounds(q, kr, kc, Tk)
    clamped_blocks = _block_flags(bound + lse > -floor, blocks)
    # One batched GEMM gives two products when the column stream is stacked: [kc; vc] for (scores, dP) and
    # [vc; kc] for (P @ vc, dS @ kc). A column of ones, met by -lse_t and -D_t on the left, makes the first GEMM
    # return S - lse and dP - D directly (one width-65 GEMM costs about what a width-64 one does; the two
    # subtractions would be two passes over the tile).
    col_stack = _with_ones(torch.cat([kc, vc, kc]))  # [3BH, Tk, d+1]
    # [q, -lse] * [kr, 1] and [dO, -D] * [vr, 1] write the rows of `left` whole (see `_forward`)
    q_aug, g_aug = torch.cat([q, -lse[:, :, None]], -1), torch.cat([dout, -delta[:, :, None]], -1)
    gq = torch.cat([dout, q])  # [2BH, Tq, d]: dvr gets (P @ vc) * dO, dkr gets (dS @ kc) * q
    ws = _Workspace(dtype, device)
    masker = Masker(w_row, w_col, mask, Tk, device, floor, dtype, finite_scores)
    kr_rows, vr_rows = _RowStream(_with_ones(kr), w_row), _RowStream(_with_ones(vr), w_row)
    dq = torch.zeros_like(q)
    dvkr = _RowGrad(2 * BH, Tk, d, w_row, dtype, device)  # [dvr; dkr]
    dvk = torch.zeros(2 * BH, Tk, d, dtype=dtype, device=device)  # [dvc; dkc]
    for block, clamp in zip(blocks, clamped_blocks):
        bq = block.stop - block.start
        dq_b = ws.get("dq", BH, bq, max(rb.stop - rb.start for rb in block.row_blocks), d)  # per (t, a)
        if len(block.row_blocks) > 1:
            dq_b.zero_()
        cols = [
            (
                cb.stop - cb.start,
                col_stack[: 2 * BH, cb.start : cb.stop],  # [kc, 1; vc, 1]
                col_stack[BH:, cb.start : cb.stop, :d],  # [vc; kc]
                dvk[:, cb.start : cb.stop],
                masker.col_runs(block, cb),
            )
            for cb in block.col_blocks
        ]
        for rb in block.row_blocks:
            ba = rb.stop - rb.start
            row_runs = masker.row_runs(block, rb)
            krb = kr_rows.tile(block, rb)  # [BH, 1 or bq, ba, d+1]
            # Rows (t, a) of [q*kr, -lse; dO*vr, -D; q*kr, -lse]: against col_stack they give (S - lse, dP - D),
            # transposed against the d columns (dvc, dkc).
            left = ws.get("left", 3 * BH, bq, ba, d + 1)
            torch.mul(q_aug[:, block.start : block.stop, None, :], krb, out=left[:BH])
            torch.mul(g_aug[:, block.start : block.stop, None, :], vr_rows.tile(block, rb), out=left[BH : 2 * BH])
            left[2 * BH :] = left[:BH]
            left = left.view(3 * BH, bq * ba, d + 1)
            left_cols = left[: 2 * BH].transpose(1, 2)  # [2BH, d+1, bq*ba]
            row_products = ws.get("row_products", 2 * BH, bq * ba, d)  # [P @ vc; dS @ kc] summed over column blocks
            for ci, (bc, kv, vk, dvk_tile, col_runs) in enumerate(cols):
                # transposed tiles, as in the forward: [2BH, bc, bq*ba]
                tile = torch.bmm(kv, left_cols, out=ws.get("tile", 2 * BH, bc, bq * ba))
                s, dp = tile[:BH], tile[BH:]  # S - lse and dP - D
                if row_runs or col_runs:
                    masker.apply(s.view(B, H, bc, bq, ba), row_runs, col_runs)
                if clamp:
                    s.clamp_min_(floor)
                dp.mul_(s.exp_())  # s becomes P, dp becomes dS = P * (dP - D)
                if ci == 0:
                    torch.bmm(tile.transpose(1, 2), vk, out=row_products)
                else:
                    row_products.baddbmm_(tile.transpose(1, 2), vk)
                dvk_tile += torch.bmm(tile, left[BH:, :, :d], out=ws.get("dvk", 2 * BH, bc, d))
            products = row_products.view(2 * BH, bq, ba, d)  # [P @ vc; dS @ kc]
            dvkr.add(block, rb, products, gq[:, block.start : block.stop, None, :])
            if len(block.row_blocks) == 1:
                torch.mul(products[BH:], krb[..., :d], out=dq_b)
            else:
                dq_b[:, :, :ba].addcmul_(products[BH:], krb[..., :d])
        torch.sum(dq_b, 2, out=dq[:, block.start : block.stop])
    # Own copies of the stacked halves: the custom op's outputs may not share a buffer (the compiled loops' do not).
    own = lambda t: t.clone(memory_format=torch.contiguous_format)  # noqa: E731
    dvkr = dvkr.result()
    return dq, own(dvkr[BH:]), own(dvk[BH:]), own(dvkr[:BH]), own(dvk[:BH])


def _problem(q, kr, kc, vr, vc, scale, w_row, w_col, mask, dtype) -> _Problem:
    B, H, Tq, D = q.shape
    Tk = kr.shape[2]
    flat = lambda t, T: t.to(dtype).reshape(B * H, T, D)  # noqa: E731
    return _Problem(
        q=flat(q, Tq) * scale, k_row=flat(kr, Tk), k_col=flat(kc, Tk), v_row=flat(vr, Tk), v_col=flat(vc, Tk),
        w_row=w_row, w_col=w_col, mask=mask, batch=B, heads=H, sizes=choose_tile_sizes(Tq, w_row, w_col),
    )


def _oriented(k1, k2, v1, v2, w1, w2):
    """(swap, w_row, w_col, (k_row, k_col, v_row, v_col)): the narrower window on the rows (module docstring)."""
    Tk = k1.shape[2]
    # A window as long as the keys excludes nothing (t - a <= Tk - 1); no window counts as the widest.
    w1, w2 = (None if w is not None and w >= Tk else w for w in (w1, w2))
    swap = w2 is not None and (w1 is None or w2 < w1)
    if swap:
        return swap, w2, w1, (k2, k1, v2, v1)
    return swap, w1, w2, (k1, k2, v1, v2)


def forward(q, k1, k2, v1, v2, scale: float, w1, w2, attention_mask, compiled):
    """(out [BH, Tq, D], lse [BH, Tq], has_pair [BH, Tq]) in the compute dtype, for finite inputs whose key/value
    heads match q's. `compiled`: the compiled tile loops (`ops.extension`) or None for the Python loops; the door
    (`ops.dispatch`) chooses."""
    _, w_row, w_col, streams = _oriented(k1, k2, v1, v2, w1, w2)
    mask = attention_mask.to(torch.bool) if attention_mask is not None else None
    return _forward(_problem(q, *streams, scale, w_row, w_col, mask, _compute_dtype(q.dtype)), compiled)


def backward(dout, q, k1, k2, v1, v2, out, lse, has_pair, scale: float, w1, w2, attention_mask, compiled):
    """Gradients of q, k1, k2, v1, v2 (shaped and typed like them, contiguous) from dout [BH, Tq, D] and what
    `forward` returned."""
    B, H, Tq, D = q.shape
    Tk = k1.shape[2]
    swap, w_row, w_col, streams = _oriented(k1, k2, v1, v2, w1, w2)
    mask = attention_mask.to(torch.bool) if attention_mask is not None else None
    problem = _problem(q, *streams, scale, w_row, w_col, mask, out.dtype)
    dq, dkr, dkc, dvr, dvc = _backward(problem, out, lse, has_pair, dout, compiled)
    # Both loops return five buffers of their own (a custom op's outputs may not alias each other), contiguous
    shape = lambda t, T, like: t.view(B, H, T, D).to(like.dtype)  # noqa: E731
    dk1, dk2, dv1, dv2 = (dkc, dkr, dvc, dvr) if swap else (dkr, dkc, dvr, dvc)
    return shape(dq * scale, Tq, q), shape(dk1, Tk, k1), shape(dk2, Tk, k2), shape(dv1, Tk, v1), shape(dv2, Tk, v2)


def output_spec(q) -> tuple[tuple, torch.dtype]:
    """Shape and dtype of `forward`'s output for q [B, H, Tq, D] (for the custom op's fake implementation)."""
    B, H, Tq, D = q.shape
    return (B * H, Tq, D), _compute_dtype(q.dtype)
