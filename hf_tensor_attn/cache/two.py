"""The two-matrix layout (paper Def. 3.8): per layer and head the Kronecker rows K̃ = K1 ⊘ K2 and Ṽ = V1 ⊘ V2,
one row per pair (a, b) of tokens. O(n^2 d) memory; a decode step is `Ṽᵀ softmax(K̃ q)` over the allowed rows.

Storage (one layer):
    pair_keys, pair_values  [B, H, capacity, D]  rows k1_a ⊙ k2_b and v1_a ⊙ v2_b; the first `num_pairs` are live
    pair_index              [2, capacity] int64  the (a, b) of each live row, shared by the whole batch
    keys, values            [B, H, L, 2D]        the token streams k1 | k2 and v1 | v2 of positions first..first+L-1

The token streams are kept because a new token t forms pairs with the earlier ones: rows k1_a ⊙ k2_t and
k1_t ⊙ k2_b cannot be recovered from K̃. They cost O(n d), next to the O(n^2 d) rows.

Rows are ordered by (max(a, b), a, b), so the rows a query at position t may use causally (max(a, b) <= t) are
a prefix, and `crop` cuts a suffix. The pair buffers grow by doubling, so appending token i+1 (its 2i+1 new
pairs) is amortised O(i d), never a copy of everything per token.

Rows are formed lazily, when a query reads them. With windows, a pair is only ever formed if some query can
use it (`b - a < w1`, `a - b < w2`), and rows that no later query can use (`a < t0 - w1 + 1` or
`b < t0 - w2 + 1`, t0 the first query position) are dropped, so the layer holds O(w1 w2 d) rows in steady state.

The layers of one cache share one memory budget (`cache_config["max_memory_bytes"]`), so an L-layer model cannot
hold L times the budget; two caches (two models, two generate calls) have budgets of their own.
"""

from __future__ import annotations

import bisect
import os

import torch

from ..ops.exact.decode import pair_rows_attention
from .base import TensorAttnCacheLayer, register_layout

# Elements gathered at once when new pair rows are formed ([B, H, rows, D]), to bound the scratch of a long prefill.
_GATHER_ELEMENTS = 1 << 22
# Pair rows whose (a, b) indices are built at once: about ten int64 numbers per row are alive while they are, which
# for the n^2 rows of a long prefill was more than the rows themselves (a 342 MiB rise before a refusal).
_PAIRS_PER_STEP = 1 << 18
# Query-block size for Tq > 1 is chosen so that one block's scores [B, H, Tq_block, P] stay about this size.
_SCORES_PER_BLOCK = 1 << 22


class TwoCacheMemoryError(MemoryError):
    """The two_cache layout would need more memory than `cache_config["max_memory_bytes"]` allows."""


def default_memory_budget(device: torch.device) -> int:
    """A quarter of the memory of `device`: physical RAM for CPU tensors, the GPU's memory for CUDA ones."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1] // 4
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): psutil if present, else 4 GiB
        try:
            import psutil

            return psutil.virtual_memory().total // 4
        except ImportError:
            return 4 << 30


class PairMemoryBudget:
    """The memory limit that the two_cache layers of one cache share: what they hold together on a device type."""

    def __init__(self, max_memory_bytes: int | None):
        self.max_memory_bytes = max_memory_bytes
        self.layers: list[TwoCacheLayer] = []

    def limit(self, device: torch.device) -> int:
        return self.max_memory_bytes if self.max_memory_bytes is not None else default_memory_budget(device)

    def held(self, device_type: str) -> int:
        return sum(layer.memory_bytes() for layer in self.layers if layer.on(device_type))


@register_layout("two_cache")
class TwoCacheLayer(TensorAttnCacheLayer):
    """Cache layer of the two-matrix layout.

    Args (`cache_config` of `cache_implementation="two_cache"`):
        max_memory_bytes (`int`, *optional*): the most bytes that the two_cache layers of this cache may hold
            together on one device type (pair rows including spare capacity, pair indices, token streams).
            Defaults to a quarter of the physical memory (of the GPU's memory for CUDA tensors). A growth that
            would pass it raises `TwoCacheMemoryError` (a `MemoryError`) before allocating anything.
    """

    traceable = False  # its pair rows grow by counts read on the host
    is_croppable = True

    def __init__(self, constants, *, max_memory_bytes: int | None = None):
        if max_memory_bytes is not None and (
            isinstance(max_memory_bytes, bool) or not isinstance(max_memory_bytes, int) or max_memory_bytes < 1
        ):
            raise ValueError(
                f"`cache_config['max_memory_bytes']` must be a positive int (bytes) or None (default: a quarter of "
                f"physical memory), got {max_memory_bytes!r}"
            )
        super().__init__(constants, max_memory_bytes=max_memory_bytes)
        self.budget = PairMemoryBudget(max_memory_bytes)
        self.budget.layers.append(self)

    @classmethod
    def build(cls, constants, count, cache_config):
        layers = super().build(constants, count, cache_config)
        shared = PairMemoryBudget(cache_config.get("max_memory_bytes"))
        for layer in layers:
            layer.budget = shared
        shared.layers.extend(layers)
        return layers

    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D2 = key_states.shape
        self.keys = key_states.new_empty(B, H, 0, D2)  # [B, H, L, 2D] token streams
        self.values = value_states.new_empty(B, H, 0, D2)
        self.pair_keys = key_states.new_empty(B, H, 0, D2 // 2)  # [B, H, capacity, D]
        self.pair_values = value_states.new_empty(B, H, 0, D2 // 2)
        self.pair_index = torch.empty(2, 0, dtype=torch.long, device=self.device)  # [2, capacity]
        self.num_pairs = 0
        self.first = 0  # absolute position of keys[:, :, 0]
        self.formed = 0  # every usable pair with max(a, b) < formed has its row
        self.low = (0, 0)  # rows with a < low[0] or b < low[1] were dropped: no later query can use them

    def append(self, key_states, value_states, attention_mask) -> None:
        """Append the token streams; the pair rows of the new tokens are formed when a query reads them."""
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens (a negative count, as transformers 5 passes)."""
        keep = self.crop_count(tokens_to_remove, self.seen)
        if keep == self.seen or not self.is_initialized:
            return
        needed = self._low_for(keep, self.constants.w1, self.constants.w2)
        if needed[0] < self.low[0] or needed[1] < self.low[1]:
            raise ValueError(
                f"cannot crop the two_cache back to {keep} tokens: with windows w1, w2 = "
                f"{(self.constants.w1, self.constants.w2)} it has "
                f"already dropped the pairs with a < {self.low[0]} or b < {self.low[1]}, which a query at "
                f"position {keep} would use. Crop at most to the first position of the last forward."
            )
        self.keys = self.keys[:, :, : max(keep - self.first, 0)]
        self.values = self.values[:, :, : max(keep - self.first, 0)]
        if self.num_pairs:
            pair_max = self.pair_index[:, : self.num_pairs].amax(0)  # ascending: rows are ordered by max(a, b)
            self.num_pairs = int(torch.searchsorted(pair_max, keep))
        self.formed = min(self.formed, keep)
        self.seen = keep

    def map_batch(self, fn) -> None:
        """Apply a batch-dimension map (reorder, repeat, select) to every per-sequence tensor, live rows only."""
        keys = fn(self.keys)
        if keys.shape[0] > self.keys.shape[0]:
            self._reserve(self.pair_keys.shape[2], batch=keys.shape[0])  # e.g. beam expansion: check the budget
        self.keys, self.values = keys, fn(self.values)
        P, capacity = self.num_pairs, self.pair_keys.shape[2]
        for name in ("pair_keys", "pair_values"):
            live = fn(getattr(self, name)[:, :, :P])  # [B', H, P, D]
            buffer = live.new_empty(live.shape[0], live.shape[1], capacity, live.shape[3])
            buffer[:, :, :P] = live
            setattr(self, name, buffer)

    def move(self, device) -> None:
        for name in ("keys", "values", "pair_keys", "pair_values", "pair_index"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=True))

    # ---- memory ----

    def memory_bytes(self) -> int:
        """Bytes held: pair rows including spare capacity, pair indices and token streams."""
        if not self.is_initialized:
            return 0
        tensors = (self.keys, self.values, self.pair_keys, self.pair_values, self.pair_index)
        return sum(t.numel() * t.element_size() for t in tensors)

    def _reserve(self, rows: int, batch: int | None = None) -> None:
        """Make room for `rows` pair rows (and `batch` sequences), growing by doubling; raise past the budget."""
        B, H, capacity, D = self.pair_keys.shape
        batch = B if batch is None else batch
        if rows <= capacity and batch == B:
            return
        new_capacity = rows if rows <= capacity else max(rows, 2 * capacity)
        row_bytes = 2 * batch * H * D * self.pair_keys.element_size() + 2 * self.pair_index.element_size()
        need = new_capacity * row_bytes + (batch - B) * (self.keys[0].numel() + self.values[0].numel()) * self.keys.element_size()
        held = self.budget.held(self.device.type)
        budget = self.budget.limit(self.device)
        if held + need > budget:
            raise TwoCacheMemoryError(
                f"two_cache needs {need:,} more bytes to hold {rows:,} pair rows (a batch of {batch} at {self.seen:,} "
                f"tokens, buffers grown to {new_capacity:,} rows); this cache's two_cache layers already hold {held:,} bytes, so "
                f"{held + need:,} would pass max_memory_bytes={budget:,}. The two-matrix layout stores every pair "
                f"(O(n^2 d) memory): use cache_implementation='four_cache' (same outputs, O(n d) memory) or "
                f"'subgen4' / 'subgen2' (compressed), or raise cache_config['max_memory_bytes']."
            )
        if batch != B:
            return  # the batch map allocates the new buffers itself
        P = self.num_pairs
        for name in ("pair_keys", "pair_values"):
            old = getattr(self, name)
            grown = old.new_empty(B, H, new_capacity, D)
            grown[:, :, :P] = old[:, :, :P]
            setattr(self, name, grown)
        index = self.pair_index.new_empty(2, new_capacity)
        index[:, :P] = self.pair_index[:, :P]
        self.pair_index = index

    def on(self, device_type: str) -> bool:
        return self.is_initialized and self.keys.device.type == device_type

    # ---- pairs ----

    @staticmethod
    def _low_for(t0: int, w1, w2) -> tuple[int, int]:
        """Smallest a (and b) any query at position >= t0 may use under the windows."""
        return (0 if w1 is None else max(t0 - w1 + 1, 0), 0 if w2 is None else max(t0 - w2 + 1, 0))

    def _shells(self, start: int, stop: int, low: tuple[int, int], w1, w2):
        """Per shell s = max(a, b) in [start, stop): s, the first a of its (a, s) rows, the first b of its (s, b)
        rows, and how many rows of each kind it has ([stop - start] each; see `_new_pairs`)."""
        s = torch.arange(start, stop, device=self.device)
        lo_a = torch.clamp(s - w1 + 1 if w1 is not None else torch.zeros_like(s), min=low[0])  # (a, s): a in [lo_a, s)
        lo_b = torch.clamp(s - w2 + 1 if w2 is not None else torch.zeros_like(s), min=low[1])  # (s, b): b in [lo_b, s]
        n_left = torch.where(s >= low[1], (s - lo_a).clamp(min=0), 0)
        n_right = torch.where(s >= low[0], (s - lo_b + 1).clamp(min=0), 0)
        return s, lo_a, lo_b, n_left, n_right

    def _new_pairs(self, start: int, stop: int, low: tuple[int, int], w1, w2) -> torch.Tensor:
        """[2, N] the usable pairs with start <= max(a, b) < stop, a >= low[0], b >= low[1], in (max, a, b) order.

        Usable means some query can see the pair: b - a < w1 (the first token still inside w1 when the second
        arrives) and a - b < w2. Shell s = max(a, b) holds (a, s) for a < s, then (s, b) for b <= s.
        """
        dev = self.device
        s, lo_a, lo_b, n_left, n_right = self._shells(start, stop, low, w1, w2)
        per_shell = n_left + n_right
        total = int(per_shell.sum())
        shell = torch.repeat_interleave(torch.arange(len(s), device=dev), per_shell)  # [N] shell of each row
        offset = torch.arange(total, device=dev) - (torch.cumsum(per_shell, 0) - per_shell)[shell]
        left = offset < n_left[shell]
        s_row = s[shell]
        a = torch.where(left, lo_a[shell] + offset, s_row)
        b = torch.where(left, s_row, lo_b[shell] + offset - n_left[shell])
        return torch.stack([a, b])

    def _form_pairs(self, t0: int) -> None:
        """Drop rows no query at position >= t0 can use, then form the rows of the pairs of the new tokens."""
        w1, w2 = self.constants.w1, self.constants.w2
        low = self._low_for(t0, w1, w2)
        if low != self.low:
            self._drop_rows_before(low)
        if self.formed < self.seen:
            # Count the rows before building any (the budget refuses before the indices of n^2 pairs exist), then
            # build them a group of shells at a time, so that the index scratch stays O(_PAIRS_PER_STEP) too.
            _, _, _, n_left, n_right = self._shells(self.formed, self.seen, low, w1, w2)
            ends = torch.cumsum(n_left + n_right, 0).tolist()  # rows up to and including each shell
            P, N = self.num_pairs, ends[-1]
            self._reserve(P + N)
            first, done = 0, 0
            while first < len(ends):
                last = max(bisect.bisect_right(ends, done + _PAIRS_PER_STEP), first + 1)  # shells [first, last)
                pairs = self._new_pairs(self.formed + first, self.formed + last, low, w1, w2)  # [2, rows]
                self._store_rows(pairs, P + done)
                first, done = last, ends[last - 1]
            self.num_pairs = P + N
            self.formed = self.seen

    def _store_rows(self, pairs: torch.Tensor, at: int) -> None:
        """Write the rows of `pairs` [2, N] (absolute positions) at row `at` onwards."""
        D = self.pair_keys.shape[-1]
        k1, k2 = self.keys[..., :D], self.keys[..., D:]  # [B, H, L, D] views
        v1, v2 = self.values[..., :D], self.values[..., D:]
        local = pairs - self.first
        N = pairs.shape[1]
        chunk = max(1, _GATHER_ELEMENTS // max(1, k1[:, :, :1].numel()))
        for r0 in range(0, N, chunk):
            r1 = min(r0 + chunk, N)
            ia, ib = local[0, r0:r1], local[1, r0:r1]
            # Slice assignment rather than mul(out=...): it also records autograd history when k / v need grad.
            self.pair_keys[:, :, at + r0 : at + r1] = k1.index_select(2, ia) * k2.index_select(2, ib)
            self.pair_values[:, :, at + r0 : at + r1] = v1.index_select(2, ia) * v2.index_select(2, ib)
        self.pair_index[:, at : at + N] = pairs

    def _drop_rows_before(self, low: tuple[int, int]) -> None:
        P = self.num_pairs
        if P:
            index = self.pair_index[:, :P]
            kept = ((index[0] >= low[0]) & (index[1] >= low[1])).nonzero().squeeze(1)  # keeps the row order
            n = kept.numel()
            if n < P:
                for name in ("pair_keys", "pair_values"):
                    buffer = getattr(self, name)
                    buffer[:, :, :n] = buffer[:, :, :P].index_select(2, kept)
                self.pair_index[:, :n] = index.index_select(1, kept)
                self.num_pairs = n
        self.low = low
        # A token older than both lows can no longer be the a or the b of a usable pair.
        first = min(low)
        if first > self.first:
            self.keys = self.keys[:, :, first - self.first :]
            self.values = self.values[:, :, first - self.first :]
            self.first = first

    # ---- attention ----

    def read(self, query, attention_mask):
        """`Ṽᵀ softmax(K̃ q)` over the pair rows each query may use (causal, windows, padding)."""
        scale, w1, w2 = self.constants.scale, self.constants.w1, self.constants.w2
        Tq = query.shape[2]
        t0 = self.seen - Tq
        self._form_pairs(t0)
        P = self.num_pairs
        index = self.pair_index[:, :P]
        kt, vt = self.pair_keys[:, :, :P], self.pair_values[:, :, :P]  # [B, H, P, D]
        real_pair = None  # [B, P]: both tokens of the pair are real
        if attention_mask is not None:
            real = attention_mask.to(device=kt.device, dtype=torch.bool)
            real_pair = real[:, index[0]] & real[:, index[1]]
        if Tq == 1:
            # Every held row is causal and inside the windows for the last position (rows are formed and
            # dropped for it), so only padding can mask.
            allowed = None if real_pair is None else real_pair[:, None, None, :]
            return pair_rows_attention(query, kt, vt, scale=scale, allowed=allowed)
        pair_max = index.amax(0)  # ascending
        B, H = query.shape[:2]
        block = max(1, _SCORES_PER_BLOCK // max(1, B * H * P))
        outs = []
        for q0 in range(0, Tq, block):
            q1 = min(q0 + block, Tq)
            t = torch.arange(t0 + q0, t0 + q1, device=kt.device)[:, None]  # [Tb, 1] absolute query positions
            n = int(torch.searchsorted(pair_max, t0 + q1 - 1, right=True))  # rows causal for the block's last query
            a, b = index[0, None, :n], index[1, None, :n]
            ok = pair_max[None, :n] <= t  # [Tb, n]
            if w1 is not None:
                ok = ok & (t - a < w1)
            if w2 is not None:
                ok = ok & (t - b < w2)
            ok = ok[None, None]  # [1, 1, Tb, n]
            if real_pair is not None:
                ok = ok & real_pair[:, None, None, :n]
            outs.append(pair_rows_attention(query[:, :, q0:q1], kt[:, :, :n], vt[:, :, :n], scale=scale, allowed=ok))
        return torch.cat(outs, dim=2)
