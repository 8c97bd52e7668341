"""Tile plan of the exact tensor-attention kernels: which key ranges each query block visits, and where masks apply.

A query block [t0, t1) (absolute positions) needs keys a < t1, and with a window w only a > t0 - w. Those key
ranges are split into blocks; a tile is (query block x row-stream block x column-stream block). Tiles wholly
inside the causal/window region of every query of the block need no mask, which is most of them; only blocks
that cross the diagonal, the window edge or a padded position get an additive 0/-inf bias.

The allowed-pair set factorises: pair (a, b) is allowed for query t iff a is allowed on its own (causal, window
w1, real token) and b is allowed on its own. So a tile's mask is a row bias over a plus a column bias over b,
never a bq x ba x bc tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeyBlock:
    start: int
    stop: int
    masked: bool  # some query of the block may not use some key of this block


@dataclass(frozen=True)
class QueryBlock:
    start: int  # index into q
    stop: int
    t0: int  # absolute position of the first query
    row_blocks: tuple[KeyBlock, ...]  # over the row stream (its keys are multiplied into q)
    col_blocks: tuple[KeyBlock, ...]  # over the column stream (the GEMM's N dimension)

    @property
    def t1(self) -> int:
        return self.t0 + self.stop - self.start


@dataclass(frozen=True)
class TileSizes:
    query: int
    row: int
    col: int


def choose_tile_sizes(Tq: int, w_row: int | None, w_col: int | None) -> TileSizes:
    """Tile sizes tuned on a 2-core AVX-512 CPU (see scripts/bench_attention.py) for head dims around 64.

    The score GEMM is (query*row, d) @ (d, col); a few hundred to a thousand rows and ~256 columns keep MKL near
    peak while the fp32 score tile of all heads stays in L2. With a window the row range of a query block spans
    w_row + query - 1 keys of which each query uses w_row, so smaller query blocks waste less.
    """
    if w_row is None:
        return TileSizes(query=16, row=32, col=256)
    query = 8 if w_row <= 64 else 16
    return TileSizes(query=query, row=min(w_row + query - 1, 64), col=256)


def _key_blocks(lo: int, hi: int, size: int, t0: int, t1: int, window: int | None, padded: list[int]) -> tuple:
    blocks = []
    for start in range(lo, hi, size):
        stop = min(start + size, hi)
        masked = stop - 1 > t0  # a later key than the block's first query
        if window is not None:
            masked = masked or (t1 - 1) - start >= window  # the last query's window ends inside the block
        masked = masked or padded[stop] - padded[start] > 0
        blocks.append(KeyBlock(start, stop, masked))
    return tuple(blocks)


def plan(Tq: int, Tk: int, w_row, w_col, attention_mask, sizes: TileSizes) -> list[QueryBlock]:
    """Query blocks with the key blocks each one visits; tiles that no query may use are never listed."""
    if attention_mask is not None:
        real = attention_mask.to(torch.bool)  # [B, Tk]
        any_pad = (~real).any(0).to(torch.int64)  # [Tk]: some sequence has a pad here
        padded = [0] + torch.cumsum(any_pad, 0).tolist()
        has_real = real.any(0)
        # Left padding: keys before the first real token of every sequence are never used.
        first_real = int(has_real.to(torch.int64).argmax()) if bool(has_real.any()) else Tk
    else:
        padded = [0] * (Tk + 1)
        first_real = 0
    blocks = []
    offset = Tk - Tq
    for start in range(0, Tq, sizes.query):
        stop = min(start + sizes.query, Tq)
        t0, t1 = offset + start, offset + stop
        row_lo = max(first_real, 0 if w_row is None else t0 - w_row + 1)
        col_lo = max(first_real, 0 if w_col is None else t0 - w_col + 1)
        if row_lo >= t1 or col_lo >= t1:
            continue
        rows = _key_blocks(row_lo, t1, sizes.row, t0, t1, w_row, padded)
        cols = _key_blocks(col_lo, t1, sizes.col, t0, t1, w_col, padded)
        blocks.append(QueryBlock(start, stop, t0, rows, cols))
    return blocks


class Masker:
    """Adds the 0/-inf bias of a masked tile to its scores, seen as [B, H, bq, ba, bc].

    The causal/window part of a key block's bias depends only on the offset of the query block within the key
    block, which repeats from block to block, so it is built once per offset and reused; padding adds a slice
    of one [B, Tk] bias. Only the keys that some query of the block may not use are touched: along the diagonal
    that is bq - 1 keys of the block, so the add costs a sliver of a pass instead of a whole one.
    """

    def __init__(self, w_row, w_col, attention_mask, dtype, device):
        self.windows = (w_row, w_col)
        self.dtype, self.device = dtype, device
        self.pad = None
        if attention_mask is not None:
            self.pad = torch.zeros(attention_mask.shape, dtype=dtype, device=device).masked_fill_(~attention_mask, float("-inf"))
            self.padded = [0] + torch.cumsum((~attention_mask).any(0).to(torch.int64), 0).tolist()
        self.cache: dict[tuple, tuple[torch.Tensor, int, int]] = {}

    def _bias(self, block: QueryBlock, kb: KeyBlock, window) -> tuple[torch.Tensor, int, int]:
        """([B or 1, bq, n] bias over the keys of kb for the queries of block, lo, hi): keys outside [lo, hi)
        of the block have bias 0 for every query."""
        bq, n = block.stop - block.start, kb.stop - kb.start
        key = (block.t0 - kb.start, bq, n, window)
        entry = self.cache.get(key)
        if entry is None:
            t = torch.arange(bq, device=self.device)[:, None] + (block.t0 - kb.start)  # query - first key
            a = torch.arange(n, device=self.device)[None, :]
            ok = a <= t
            if window is not None:
                ok = ok & (t - a < window)
            rel = torch.zeros(bq, n, dtype=self.dtype, device=self.device).masked_fill_(~ok, float("-inf"))
            cols = (~ok).any(0).nonzero()
            lo, hi = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 0)
            entry = self.cache[key] = (rel[None], lo, hi)
        if self.pad is not None and self.padded[kb.stop] > self.padded[kb.start]:
            return entry[0] + self.pad[:, None, kb.start : kb.stop], 0, n
        return entry

    def apply(self, scores: torch.Tensor, block: QueryBlock, rb: KeyBlock, cb: KeyBlock, B: int, H: int) -> None:
        bq = block.stop - block.start
        s5 = scores.view(B, H, bq, rb.stop - rb.start, cb.stop - cb.start)
        if rb.masked:
            bias, lo, hi = self._bias(block, rb, self.windows[0])
            if hi > lo:
                s5[:, :, :, lo:hi].add_(bias[:, None, :, lo:hi, None])
        if cb.masked:
            bias, lo, hi = self._bias(block, cb, self.windows[1])
            if hi > lo:
                s5[..., lo:hi].add_(bias[:, None, :, None, lo:hi])
