"""Tile plan of the exact tensor-attention kernels: which key ranges each query block visits, and where masks apply.

A query block [t0, t1) (absolute positions) needs keys a < t1, and with a window w only a > t0 - w. A tile is
(query block x row-stream block x column-stream block): the row stream's keys are multiplied into the queries
(rows (t, a) of the score GEMM), the column stream is the GEMM's N dimension.

Row blocks come in two kinds. Without a row window they are aligned key ranges [start, stop) shared by the
queries of the block. With a row window w they are ranges [start, stop) of the window offset j, and query t
uses the key a = t - w + 1 + j: each query gets exactly its own window, so a window costs no wasted rows.
Column blocks are always aligned ranges (the GEMM's columns are shared by all rows).

The allowed-pair set factorises: pair (a, b) is allowed for query t iff a is allowed on its own (causal, window
w1, real token) and b is allowed on its own. So a tile's mask is a row mask over a or'ed with a column mask over b,
never a bq x ba x bc tensor, and most tiles (wholly inside every query's causal/window region, no padding) need
none.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

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
    row_blocks: tuple[KeyBlock, ...]  # row-stream keys, or window offsets j when the row stream has a window
    col_blocks: tuple[KeyBlock, ...]  # column-stream keys

    @property
    def t1(self) -> int:
        return self.t0 + self.stop - self.start


@dataclass(frozen=True)
class TileSizes:
    query: int
    row: int
    col: int


def choose_tile_sizes(Tq: int, w_row: int | None, w_col: int | None) -> TileSizes:
    """Tile sizes for head dims around 64 (see scripts/bench/bench_attention.py and profile_attention.py).

    16 queries x 32 row keys make 512 rows in the score GEMM and `_columns_for_cache` picks the columns, so MKL runs
    near its peak while a head's fp32 score tile stays within half of a core's L2. Larger query blocks would cut the
    per-block costs (a dozen kernel launches) but waste more pairs: on the diagonal, and in windowed column blocks,
    which span w_col + query - 1 keys of which each query uses w_col. The block shape is a measured choice: what was
    compared, and why no other shape won, is in docs/bench_attention.md ("Windowed runs").
    """
    row = 32 if w_row is None else min(w_row, 32)
    return TileSizes(query=16, row=row, col=_columns_for_cache(16 * 32, l2_size()[0]))


L2_ENV = "HF_TENSOR_ATTN_L2_BYTES"


@functools.cache
def l2_size() -> tuple[int | None, str]:
    """The per-core L2 size the planner sizes tiles for, and where it came from: HF_TENSOR_ATTN_L2_BYTES (bytes, or
    with a K or M suffix), else what Linux reports for cpu0, else None. Read once per process: the tile sizes of a
    process do not change under it, and a test or a CI run that fixes the size sets it before the first call."""
    value = os.environ.get(L2_ENV)
    if value is not None:
        size = _size_in_bytes(value.strip())
        if size is None or size <= 0:
            raise ValueError(f"{L2_ENV} must be a positive number of bytes, optionally with a K or M suffix (e.g. "
                             f"524288, 512K, 2M), got {value!r}")
        return size, L2_ENV
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(root.glob("index*")):
            if (index / "level").read_text().strip() == "2":
                return _size_in_bytes((index / "size").read_text().strip()), str(index / "size")
    except OSError:
        pass
    return None, "unknown (no L2 size under /sys/devices/system/cpu/cpu0/cache)"


def _size_in_bytes(text: str) -> int | None:
    match = re.fullmatch(r"(\d+)([KM]?)", text.upper())
    return int(match[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20}[match[2]] if match else None


def _columns_for_cache(rows: int, l2: int | None) -> int:
    """Column block size: 256, or fewer where one head's fp32 score tile (rows x cols) would take more than half
    of the core's L2 (the other half holds the operands), e.g. 128 on a 512 KiB-L2 core with 512 rows. The tile
    is reused right after the GEMM by exp, the row sums and the value GEMM; from L3 each of those passes costs
    more. Never under 128 columns, where per-tile costs outweigh the cache misses."""
    if l2 is None:
        return 256
    return max(128, min(256, l2 // 2 // (4 * rows) // 16 * 16))


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


def _window_blocks(t0: int, t1: int, w: int, size: int, first_real: int, padded: list[int]) -> tuple:
    """Blocks of window offsets j in [0, w): query t uses key t - w + 1 + j."""
    blocks = []
    for start in range(0, w, size):
        stop = min(start + size, w)
        lo, hi = t0 - w + 1 + start, t1 - w + stop  # keys touched by the block: [lo, hi)
        if hi <= first_real:
            continue  # before the sequence or all padding
        masked = lo < 0 or padded[hi] - padded[max(lo, 0)] > 0
        blocks.append(KeyBlock(start, stop, masked))
    return tuple(blocks)


def plan(Tq: int, Tk: int, w_row, w_col, attention_mask, sizes: TileSizes) -> tuple[QueryBlock, ...]:
    """Query blocks with the key blocks each one visits; tiles that no query may use are never listed. Plans
    without a mask depend on the shapes only and are kept (building one costs about as much as a small call's
    compiled tile loop)."""
    if attention_mask is None:
        return _unmasked_plan(Tq, Tk, w_row, w_col, sizes)
    return _plan(Tq, Tk, w_row, w_col, attention_mask, sizes)


class _KeptPlan(tuple):
    """A plan kept by `plan` (no mask), with its packed tables once `pack` has made them."""

    tables = None


@functools.lru_cache(maxsize=64)
def _unmasked_plan(Tq: int, Tk: int, w_row, w_col, sizes: TileSizes) -> tuple[QueryBlock, ...]:
    return _KeptPlan(_plan(Tq, Tk, w_row, w_col, None, sizes))


def _plan(Tq: int, Tk: int, w_row, w_col, attention_mask, sizes: TileSizes) -> tuple[QueryBlock, ...]:
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
        col_lo = max(first_real, 0 if w_col is None else t0 - w_col + 1)
        if w_row is None:
            rows = _key_blocks(first_real, t1, sizes.row, t0, t1, None, padded)
        else:
            rows = _window_blocks(t0, t1, w_row, sizes.row, first_real, padded)
        if not rows or col_lo >= t1:
            continue
        col_size = sizes.col
        if w_col is not None:
            # A windowed band (w_col + bq - 1 keys) in equal blocks: [256, 256, 15] for w_col = 512 would pay a
            # whole tile's fixed costs (and its masks) for 15 keys.
            band = t1 - col_lo
            col_size = -(-band // -(-band // sizes.col))
        cols = _key_blocks(col_lo, t1, col_size, t0, t1, w_col, padded)
        blocks.append(QueryBlock(start, stop, t0, rows, cols))
    return tuple(blocks)


def pack(blocks: tuple[QueryBlock, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plan as int64 tables for the compiled loop (`csrc/tiles.cpp`): blocks [n, 7] = (start, stop, t0, first
    and end row block, first and end column block), rows and columns [n, 3] = (start, stop, masked). The tables of a
    kept plan (`plan` without a mask) are kept with it and shared, read-only."""
    tables = getattr(blocks, "tables", None)
    if tables is None:
        tables = _pack(blocks)
        if isinstance(blocks, _KeptPlan):
            blocks.tables = tables
    return tables


def _pack(blocks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    table, rows, cols = [], [], []
    for block in blocks:
        r0, c0 = len(rows), len(cols)
        rows += [(rb.start, rb.stop, int(rb.masked)) for rb in block.row_blocks]
        cols += [(cb.start, cb.stop, int(cb.masked)) for cb in block.col_blocks]
        table.append((block.start, block.stop, block.t0, r0, len(rows), c0, len(cols)))
    return tuple(torch.tensor(x, dtype=torch.int64).view(-1, width) for x, width in ((table, 7), (rows, 3), (cols, 3)))


class Masker:
    """Sets the scores of the pairs a query may not use to the exp floor (`common.EXP_FLOOR`: exp gives ~1e-35 there,
    far below rounding against the reference pair's 1, and stays on its vector path, which -inf would leave).

    The causal/window mask of an aligned key block depends only on the offset of the query block within the key
    block, which repeats from block to block, so it is built once per offset and reused; padding adds a slice
    of one [B, Tk] mask. Only the keys that some query of the block may not use are touched: along the diagonal
    that is bq - 1 keys of the block, a sliver of a pass instead of a whole one. Windowed row blocks read their
    mask (keys before 0, padding) as a Hankel view of one [B, w - 1 + Tk] vector.
    """

    def __init__(self, w_row, w_col, attention_mask, Tk, device, floor: float, dtype: torch.dtype,
                 finite_scores: bool):
        self.windows = (w_row, w_col)
        self.floor = floor
        self.device = device
        self.dtype = dtype
        # Every score of the call is known finite (the bound of `tiled._score_bounds`): masked scores may then be
        # set by arithmetic, s * 0 + floor, which an infinite score would turn into NaN.
        self.finite_scores = finite_scores
        self.pad = None  # [B, Tk] bool: padding
        self.padded = None
        if attention_mask is not None:
            self.pad = ~attention_mask.to(device)
            self.padded = [0] + torch.cumsum(self.pad.any(0).to(torch.int64), 0).tolist()
        if w_row is not None:
            pad = self.pad if self.pad is not None else torch.zeros(1, Tk, dtype=torch.bool, device=device)
            before = torch.ones(pad.shape[0], w_row - 1, dtype=torch.bool, device=device)
            self.row_ext = torch.cat([before, pad], 1).contiguous()  # [B or 1, w_row - 1 + Tk]: key a at a + w_row - 1
        self.cache: dict[tuple, tuple[torch.Tensor, list[tuple[int, int]]]] = {}
        self.col_cache: dict[tuple, list] = {}
        self.factors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # see `apply`

    def _has_pad(self, lo: int, hi: int) -> bool:
        return self.padded is not None and self.padded[hi] > self.padded[max(lo, 0)]

    def _mask(self, block: QueryBlock, kb: KeyBlock, window) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """[B or 1, bq, n] bool, True where a query of block may not use a key of aligned block kb, and the runs
        [lo, hi) of keys where some query may not (at the diagonal and at the window's far edge)."""
        bq, n = block.stop - block.start, kb.stop - kb.start
        key = (block.t0 - kb.start, bq, n, window)
        entry = self.cache.get(key)
        if entry is None:
            t = torch.arange(bq, device=self.device)[:, None] + (block.t0 - kb.start)  # query - first key
            a = torch.arange(n, device=self.device)[None, :]
            ok = a <= t
            if window is not None:
                ok = ok & (t - a < window)
            entry = self.cache[key] = (~ok[None], _runs((~ok).any(0).tolist()))
        if self._has_pad(kb.start, kb.stop):
            return entry[0] | self.pad[:, None, kb.start : kb.stop], [(0, n)]
        return entry

    def _window_mask(self, block: QueryBlock, rb: KeyBlock) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Mask of a windowed row block: entry [t, j] belongs to key block.t0 + t - w + 1 + j."""
        w = self.windows[0]
        bq, n = block.stop - block.start, rb.stop - rb.start
        first = block.t0 - w + 1 + rb.start  # key of the block's first query at its first offset
        ext = self.row_ext
        blocked = ext.as_strided((ext.shape[0], bq, n), (ext.stride(0), 1, 1), first + w - 1)  # [B or 1, bq, n]
        if self._has_pad(first, first + bq + n - 1):
            return blocked, [(0, n)]
        return blocked, [(0, min(n, -first))] if first < 0 else []  # offsets whose key is < 0 for the first query

    def row_runs(self, block: QueryBlock, rb: KeyBlock) -> list[tuple[int, int, torch.Tensor]]:
        """(lo, hi, mask [B or 1, 1, 1, bq, hi - lo]) for the rows of a row block that need a mask."""
        if not rb.masked:
            return []
        blocked, runs = self._mask(block, rb, None) if self.windows[0] is None else self._window_mask(block, rb)
        return [(lo, hi, blocked[:, None, None, :, lo:hi]) for lo, hi in runs]

    def col_runs(self, block: QueryBlock, cb: KeyBlock) -> list[tuple[int, int, torch.Tensor, tuple | None]]:
        """(lo, hi, mask [B or 1, 1, hi - lo, bq, 1], pattern) for the columns of a column block that need a mask;
        pattern names the run's mask for the (keep, fill) factors of `apply` (None: padded, or scores may be
        infinite). A run's mask depends only on where its first key sits relative to the block's first query."""
        if not cb.masked:
            return []
        # Every interior block of a windowed pass asks for the same runs: keep the views (building them is most of
        # a small tile's Python time).
        key = (block.t0 - cb.start, block.stop - block.start, cb.stop - cb.start)
        padded = self._has_pad(cb.start, cb.stop)
        if not padded and key in self.col_cache:
            return self.col_cache[key]
        blocked, runs = self._mask(block, cb, self.windows[1])
        offset = block.t0 - cb.start
        ready = [(lo, hi, blocked[:, None, :, lo:hi].transpose(2, 3)[..., None],
                  (offset - lo, hi - lo, block.stop - block.start) if self.finite_scores and not padded else None)
                 for lo, hi in runs]
        if not padded:
            self.col_cache[key] = ready
        return ready

    def apply(self, scores5: torch.Tensor, row_runs, col_runs) -> None:
        """Sets the masked scores of a transposed tile, seen as [B, H, bc, bq, ba], to the floor (one pass per run; an
        unmasked score under the floor is clamped by the caller with the whole tile when the score bound allows one).

        Tiles are stored column-major (a column key's scores for every (query, row key) are contiguous) so that the
        column runs, the ones every windowed tile has, are whole contiguous rows of the tile: as [.., bq, ba, bc]
        slices they were strided passes with a short inner loop, several times slower per element. An unpadded run
        is set as fill + s * keep with dense [1, 1, hi - lo, bq, ba] factors built once per mask pattern and row
        block size (a windowed pass has two patterns, a causal one one per row block size): masked_fill_ with a mask
        broadcast over the row keys ran at about a third of that speed (37-43 us against 15 us for a 15-column run
        of a 4-head, 512-row tile)."""
        for lo, hi, blocked, pattern in col_runs:
            region = scores5[:, :, lo:hi]
            if pattern is None:
                region.masked_fill_(blocked, self.floor)
                continue
            ba = region.shape[-1]
            factors = self.factors.get((pattern, ba))
            if factors is None:
                full = blocked.expand(*blocked.shape[:-1], ba)
                factors = self.factors[(pattern, ba)] = ((~full).to(self.dtype), full.to(self.dtype) * self.floor)
            torch.addcmul(factors[1], region, factors[0], out=region)
        for lo, hi, blocked in row_runs:
            scores5[..., lo:hi].masked_fill_(blocked, self.floor)


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs [lo, hi) of True in flags."""
    runs, lo = [], None
    for i, flag in enumerate(flags + [False]):
        if flag and lo is None:
            lo = i
        elif not flag and lo is not None:
            runs.append((lo, i))
            lo = None
    return runs
