"""SubGen eviction (after Zandieh et al. 2024; the KV-cache paper's Lemmas 5.1/5.2): memory sublinear in the
sequence length when keys cluster.

Both layouts keep an exact window of tokens (the first `sink_tokens` positions and the `recent_window` most recent
ones) and summarise every token that leaves it with `summary.StreamSummary`:

- ``subgen4`` summarises the (k1, v1) and (k2, v2) streams independently. A query then attends to the weighted
  rows of each stream (exact tokens with weight 1, summary rows with their estimator weights) through one
  factorized product: a pair's weight is the product of its two rows' weights, its value v1 ⊙ v2. Pairs of two
  exact tokens are therefore exact, pairs with a summarised token estimated.
- ``subgen2`` summarises the stream of pair rows (k1_a ⊙ k2_b, v1_a ⊙ v2_b) of the two-cache layout. A pair enters
  that summary as soon as one of its tokens is summarised. The rows of a new token with tokens summarised before
  it arrived cannot be formed exactly (their keys are gone; the paper's streaming model takes the rows as given),
  so each stream also keeps a summary of its evicted tokens, and those pairs are formed from its rows
  (cluster means, or reservoir samples: unbiased either way in expectation for "sampled", within δ for
  "cluster_sum"). Memory is that of subgen4 plus the pair summary, whose clusters are pairs of clusters.

Tokens are summarised lazily: `update` appends new tokens to the exact buffer, `attend` answers the queries and then
evicts what falls outside the window. A prompt (nothing evicted yet) is therefore attended exactly by the tiled
`ops.tensor_attention`, and summarised afterwards. Pad tokens (attention_mask 0) never enter a summary.

Sinks are the first `sink_tokens` *positions*, shared by every row of the batch: with left padding a shorter row's
sinks may be pads, which are simply masked.

**Bounded memory.** `max_clusters` caps the clusters of every summary (per head); `budget_bytes` caps the bytes of
the whole layer (all batch rows, exact window included) by deriving that cap from the layer's shapes. Over the cap
a summary merges its nearest clusters and grows its radius (`summary.StreamSummary`), so `memory_bytes()` stays
within the budget on any key stream. It is measured between steps: within a forward the layer also holds that
step's new tokens (the whole prompt during prefill) until it evicts them after attending.

**Standard layers.** `StandardSubGenCacheLayer` is SubGen for the softmax-attention layers of a hybrid stack (the
original SubGen setting): one summary of the (k, v) stream; the denominator from the clusters, the numerator from
cluster value sums or ℓ2 samples. `TensorAttnCache` builds it for every standard layer when
`cache_config["standard_layers"] == "subgen"`, with the same options as the tensor layers.
"""

from __future__ import annotations

import math

import torch

from ..ops import attention
from ..ops.dispatch import weighted_pair_attention
from ..ops.common import fold_groups, unfold_groups
from ..ops.subgen.estimators import NUMERATORS, combine, log_weights, weighted_pair_sums, weighted_row_sums
from .summary import StreamSummary
from .base import TensorAttnCacheLayer, register_layout

QUERY_BLOCK = 16  # queries estimated together when a chunk continues a summarised sequence
INSERT_ELEMENTS = 1 << 22  # rows x clusters per summary insert, bounding the distance matrix


def _check_int(name, value, low, high=None, what=""):
    bad = isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high)
    if bad:
        upper = f" and <= {high}" if high is not None else ""
        raise ValueError(f"`cache_config['{name}']` must be an int >= {low}{upper}{what}, got {value!r}")


class _SubGenLayer(TensorAttnCacheLayer):
    """What both SubGen layouts share: options, the exact buffer, lazy eviction and the batch operations."""

    traceable = False  # clusters form by thresholds read on the host, from a seeded generator

    why_not_croppable = "evicted tokens are merged into cluster summaries and cannot be un-merged"

    def __init__(self, constants, *, delta: float = 0.5, cluster_samples: int = 8, value_samples: int = 64,
                 recent_window: int = 64, sink_tokens: int = 4, seed: int = 0, numerator: str = "cluster_sum",
                 max_clusters: int | None = None, budget_bytes: int | None = None):
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta) or delta < 0:
            raise ValueError(f"`cache_config['delta']` must be a finite float >= 0 (l2 clustering radius of keys), got {delta!r}")
        _check_int("cluster_samples", cluster_samples, 1, what=" (reservoir size per cluster)")
        _check_int("value_samples", value_samples, 1, what=" (number of ℓ2 value samplers)")
        _check_int("recent_window", recent_window, 0, what=" (recent tokens kept exactly)")
        _check_int("sink_tokens", sink_tokens, 0, what=" (first tokens kept exactly)")
        _check_int("seed", seed, 0, 2**63 - 1)
        if numerator not in NUMERATORS:
            raise ValueError(f"`cache_config['numerator']` must be one of {list(NUMERATORS)}, got {numerator!r}")
        if max_clusters is not None:
            _check_int("max_clusters", max_clusters, 1, what=" or None (clusters per head and summary)")
        if budget_bytes is not None:
            _check_int("budget_bytes", budget_bytes, 1, what=" or None (bytes of the whole layer, all batch rows)")
        self.cfg = dict(delta=delta, cluster_samples=cluster_samples, value_samples=value_samples,
                        recent_window=recent_window, sink_tokens=sink_tokens, seed=seed, numerator=numerator,
                        max_clusters=max_clusters, budget_bytes=budget_bytes)
        super().__init__(constants, **self.cfg)
        self.check_windows()

    # -- layout hooks -----------------------------------------------------------------------------------------

    def _init_summaries(self, B, H, D):
        raise NotImplementedError

    def _summaries(self) -> list[StreamSummary]:
        raise NotImplementedError

    def _summarise(self, evicted: slice) -> None:
        """Move the exact tokens in `evicted` (a slice of the exact buffer) and the pending tokens into summaries."""
        raise NotImplementedError

    def _parts(self, q, lw1, lw2):
        """Partial sums (num parts, den parts) for queries q [B, H, Tq, D] given the exact rows' log-weights."""
        raise NotImplementedError

    def check_windows(self) -> None:
        """Summarised tokens cannot honour a window: the exact window must cover it."""
        W = self.cfg["recent_window"]
        for name, w in (("w1", self.constants.w1), ("w2", self.constants.w2)):
            if w is not None and W < w:
                raise ValueError(
                    f"cache_implementation={self.layout_name!r} with a windowed model ({name}={w}) needs "
                    f"cache_config['recent_window'] >= {w} (summarised tokens cannot honour a window), got {W}"
                )

    # -- the protocol -----------------------------------------------------------------------------------------

    def allocate(self, key_states, value_states) -> None:
        B, H, _, D2 = key_states.shape
        # Summaries accumulate sums and weights: keep them in float32 at least.
        self.sdtype = torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype
        self.generator = torch.Generator(device=self.device).manual_seed(self.cfg["seed"])
        self.keys = key_states.new_zeros(B, H, 0, D2)  # exact tokens: k1 | k2
        self.values = value_states.new_zeros(B, H, 0, D2)  # v1 | v2
        self.real = torch.zeros(B, 0, dtype=torch.bool, device=self.device)  # [B, exact] not a pad
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # [exact] absolute positions
        self.n_pending = 0  # the last n_pending exact tokens arrived since the last eviction
        self.n_evicted = 0
        self._init_summaries(B, H, D2 // self.stream_count)
        self._apply_cap()

    def _apply_cap(self) -> None:
        """Cap every summary at `max_clusters`, or at what `budget_bytes` leaves after the exact window."""
        cap, budget = self.cfg["max_clusters"], self.cfg["budget_bytes"]
        B, H, _, D2 = self.keys.shape
        if budget is None and cap is None or B == 0:
            return
        summaries = self._summaries()
        if budget is not None:
            # The exact buffer holds at most sink_tokens + recent_window tokens between steps.
            per_token = B * H * D2 * (self.keys.element_size() + self.values.element_size()) + B + 8  # + real, position
            fixed = (self.cfg["sink_tokens"] + self.cfg["recent_window"]) * per_token
            fixed += sum(s.fixed_bytes() for s in summaries)
            per_cluster = sum(s.cluster_bytes() for s in summaries)
            fit = (budget - fixed) // per_cluster
            if fit < 1:
                raise ValueError(
                    f"`cache_config['budget_bytes']` must be at least {fixed + per_cluster} for this layer (batch {B}, "
                    f"{H} heads, width {D2}: the exact window of sink_tokens + recent_window = "
                    f"{self.cfg['sink_tokens'] + self.cfg['recent_window']} tokens and one cluster per summary), got "
                    f"{budget}; raise it or shrink recent_window / sink_tokens"
                )
            cap = fit if cap is None else min(cap, fit)
        for summary in summaries:
            summary.limit(cap)

    def append(self, key_states, value_states, attention_mask) -> None:
        self._evict()  # in case no query read the previous tokens
        B, _, T, _ = key_states.shape
        if attention_mask is None:
            real = torch.ones(B, T, dtype=torch.bool, device=self.device)
        else:
            real = attention_mask[:, -T:].to(device=self.device, dtype=torch.bool)
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        self.real = torch.cat([self.real, real], dim=1)
        self.positions = torch.cat([self.positions, torch.arange(self.seen, self.seen + T, device=self.device)])
        self.n_pending += T

    def read(self, query, attention_mask):
        """Exact attention while nothing is summarised, the estimators afterwards; then evict."""
        out = self._exact(query) if self.n_evicted == 0 else self._estimate_blocks(query)
        self._evict()
        return out

    def _exact(self, query):
        """Nothing summarised yet: the exact buffer is the whole sequence, attend exactly."""
        mask = None if bool(self.real.all()) else self.real.long()
        return attention(self.constants, query, self.keys, self.values, attention_mask=mask, workspace=self.workspace,
                         checked=True)

    def _estimate_blocks(self, query):
        Tq = query.shape[2]
        return torch.cat(
            [self._estimate(query[:, :, i : i + QUERY_BLOCK], Tq - i) for i in range(0, Tq, QUERY_BLOCK)], dim=2
        ).to(query.dtype)

    def _exact_log_weights(self, Tq_block: int, from_end: int, window):
        """[B, 1, Tq_block, Ne] log-weights of the exact tokens for queries ending `from_end` positions before the end."""
        qpos = torch.arange(self.seen - from_end, self.seen - from_end + Tq_block, device=self.device)[:, None]
        ok = (self.positions[None, :] <= qpos)[None] & self.real[:, None, :]  # [B, Tq, Ne]
        if window is not None:
            ok = ok & (qpos - self.positions[None, :] < window)[None]
        zero = torch.zeros((), dtype=self.sdtype, device=self.device)
        return torch.where(ok, zero, float("-inf"))[:, None]

    def _grouped_parts(self, query, from_end):
        """`_parts` for query [B, H, Tq, D] over the H_kv heads held: the G query heads of a group are folded into
        G * Tq query rows of their key/value head (the log-weights, per position, tiled to match), so no summary
        is repeated per query head. Returns the parts with [B, H_kv, G * Tq, ...] shapes."""
        H_kv = self.keys.shape[1]
        Tq = query.shape[2]
        groups = query.shape[1] // H_kv
        q = fold_groups(query.to(self.sdtype), H_kv)
        lw1, lw2 = (self._exact_log_weights(Tq, from_end, w).repeat(1, 1, groups, 1)
                    for w in (self.constants.w1, self.constants.w2))
        return self._parts(q, lw1, lw2)

    def _estimate(self, q, from_end):
        return unfold_groups(combine(*self._grouped_parts(q, from_end)), q.shape[1])

    def estimate_sums(self, query):
        """The unnormalised estimates (N̂ [B, H, Tq, D], Ẑ [B, H, Tq]) for the last Tq positions, both scaled by
        exp(-shift) with the returned shift [B, H, Tq]: Ô = N̂ / Ẑ. For tests and evaluation; evicts nothing."""
        nums, dens = self._grouped_parts(query, query.shape[2])
        top = torch.stack([p[2] for p in nums + dens]).amax(0)
        num = sum(p[0] * torch.exp(p[2] - top)[..., None] for p in nums)
        den = sum(p[1] * torch.exp(p[2] - top) for p in dens)
        H = query.shape[1]
        return unfold_groups(num, H), unfold_groups(den, H), unfold_groups(top, H)

    def _evict(self) -> None:
        """Summarise the exact tokens outside the sinks and the recent window, then drop them."""
        if not self.is_initialized or self.n_pending == 0:
            return
        Ne = self.keys.shape[2]
        # Sinks are never evicted: the exact buffer starts with every position below sink_tokens seen so far.
        n_sinks = min(self.cfg["sink_tokens"], self.seen)
        stop = max(Ne - self.cfg["recent_window"], n_sinks)
        evicted = slice(n_sinks, stop)
        self._summarise(evicted)
        self.n_pending = 0
        if stop > n_sinks:
            keep = torch.cat([torch.arange(n_sinks), torch.arange(stop, Ne)]).to(self.device)
            self.keys, self.values = self.keys[:, :, keep], self.values[:, :, keep]
            self.real, self.positions = self.real[:, keep], self.positions[keep]
            self.n_evicted += stop - n_sinks

    def _rows(self, part: slice, stream: int):
        """Exact keys, values [B, H, n, D] of stream 1 or 2 and weights [B, H, n] for the tokens in `part`."""
        D = self.keys.shape[-1] // self.stream_count
        cols = slice(0, D) if stream == 1 else slice(D, 2 * D)  # stream 1 of a standard layer: its whole width
        k = self.keys[:, :, part, cols].to(self.sdtype)
        v = self.values[:, :, part, cols].to(self.sdtype)
        w = self.real[:, None, part].to(self.sdtype).expand(k.shape[:3])
        return k, v, w

    def memory_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        held = sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.real, self.positions))
        return held + sum(s.memory_bytes() for s in self._summaries())

    def map_batch(self, fn) -> None:
        self.keys, self.values, self.real = fn(self.keys), fn(self.values), fn(self.real)
        for summary in self._summaries():
            summary.apply(fn)
        self._apply_cap()  # a larger batch (beams) leaves fewer clusters within the same budget

    def move(self, device) -> None:
        self.positions = self.positions.to(device, non_blocking=True)
        self.map_batch(lambda t: t.to(device, non_blocking=True))

    def _summary(self, B, H, D, **kw) -> StreamSummary:
        c = self.cfg
        opts = dict(delta=c["delta"], numerator=c["numerator"], cluster_samples=c["cluster_samples"],
                    value_samples=c["value_samples"], dtype=self.sdtype, device=self.device, generator=self.generator)
        return StreamSummary(B, H, D, **{**opts, **kw})


def _insert_chunked(summary: StreamSummary, keys, values, weights) -> None:
    """Insert rows in chunks so that the rows x clusters distance matrix stays bounded."""
    B, H, R, _ = keys.shape
    step = max(1, INSERT_ELEMENTS // max(1, B * H * max(summary.capacity, 1)))
    for i in range(0, R, step):
        summary.insert(keys[:, :, i : i + step], values[:, :, i : i + step], weights[:, :, i : i + step])


@register_layout("subgen4")
class SubGen4CacheLayer(_SubGenLayer):
    """SubGen on the four-matrix layout: per-stream summaries of (k1, v1) and (k2, v2), combined pairwise.

    cache_config: delta (clustering radius, default 0.5), cluster_samples (reservoir size t per cluster, 8),
    value_samples (ℓ2 samplers s, 64), recent_window (64), sink_tokens (4), seed (0), numerator ("cluster_sum" or
    "sampled"; cluster_samples and value_samples only matter for "sampled"), max_clusters (None: unbounded) and
    budget_bytes (None; bytes of this layer, all batch rows: see the module docstring). Every layer's generator starts from
    `seed`, so a run is reproducible whatever the global torch seed. "cluster_sum" is the default because it was
    measured better at equal memory (scripts/bench/eval_subgen.py; docs/eval_subgen.md).
    """

    def _init_summaries(self, B, H, D):
        self.streams = [self._summary(B, H, D), self._summary(B, H, D)]

    def _summaries(self):
        return self.streams

    def _summarise(self, evicted):
        windows = (self.constants.w1, self.constants.w2)
        for stream, summary, window in zip((1, 2), self.streams, windows):
            if window is None:  # a windowed stream never sees an evicted token again: summarising it wastes memory
                _insert_chunked(summary, *self._rows(evicted, stream))

    def _stream_rows(self, lws, which):
        """Per stream: its exact rows, then its summary's rows for the numerator or the denominator (`which`; none
        for a windowed stream: all outside its window), as (keys, values, log-weights [B, H, Tq, rows]) given the
        exact rows' log-weights lws [B, 1, Tq, Ne] per stream."""
        B, H = self.keys.shape[:2]
        out = []
        for stream, summary, window, lw in zip((1, 2), self.streams, (self.constants.w1, self.constants.w2), lws):
            k, v, _ = self._rows(slice(None), stream)
            Tq = lw.shape[2]
            lw = lw.expand(B, H, Tq, -1)
            if window is None:
                if which == "den":
                    sk, sw = summary.denominator_rows()
                    sv = torch.zeros_like(sk)
                else:
                    sk, sv, sw = summary.numerator_rows()
                k, v = torch.cat([k, sk], 2), torch.cat([v, sv], 2)
                lw = torch.cat([lw, log_weights(sw)[:, :, None].expand(B, H, Tq, -1)], -1)
            out.append((k, v, lw))
        return out

    def _estimate(self, q, from_end):
        if q.shape[2] > 1 or self.cfg["numerator"] != "cluster_sum":
            return super()._estimate(q, from_end)
        # A decode step with cluster sums: one part over the weighted rows (exact tokens, cluster means) of both
        # streams, the normalised output in one call of the door's implementation (the compiled four-matrix step
        # with the log-weights as biases), not scores and probabilities of every pair as torch ops.
        lws = [self._exact_log_weights(1, from_end, w) for w in (self.constants.w1, self.constants.w2)]
        (k1, v1, l1), (k2, v2, l2) = self._stream_rows(lws, "num")
        return weighted_pair_attention(q.to(self.sdtype), k1, l1[:, :, 0], k2, l2[:, :, 0], scale=self.constants.scale,
                                       v1=v1, v2=v2)

    def _parts(self, q, lw1, lw2):
        scale = self.constants.scale
        (k1, v1, l1), (k2, v2, l2) = self._stream_rows((lw1, lw2), "num")
        num = weighted_pair_sums(q, k1, l1, k2, l2, scale=scale, v1=v1, v2=v2)
        if self.cfg["numerator"] == "cluster_sum":
            return [num], [num]
        (k1, _, l1), (k2, _, l2) = self._stream_rows((lw1, lw2), "den")
        den = weighted_pair_sums(q, k1, l1, k2, l2, scale=scale)
        return [num], [den]


@register_layout("subgen2")
class SubGen2CacheLayer(_SubGenLayer):
    """SubGen on the two-matrix layout: a summary of the pair rows (k1_a ⊙ k2_b, v1_a ⊙ v2_b), plus per-stream
    summaries of evicted tokens to form the pairs of later tokens with them (see the module docstring).

    cache_config: as `SubGen4CacheLayer`.
    """

    def _init_summaries(self, B, H, D):
        sampled = self.cfg["numerator"] == "sampled"
        # The per-stream sources only generate rows: reservoir values yes, ℓ2 samplers no.
        self.sources = [self._summary(B, H, D, reservoir_values=sampled, value_samples=0) for _ in range(2)]
        self.pairs = self._summary(B, H, D, weighted=True)

    def _summaries(self):
        return [*self.sources, self.pairs]

    def _summarise(self, evicted):
        B, H = self.keys.shape[:2]
        Ne = self.keys.shape[2]
        pending = slice(Ne - self.n_pending, Ne)
        # Pairs of the new tokens with tokens summarised before they arrived: from the per-stream sources.
        if self.n_evicted:
            sk1, sv1, sw1 = self.sources[0].source_rows()
            sk2, sv2, sw2 = self.sources[1].source_rows()
            pk1, pv1, pw1 = self._rows(pending, 1)
            pk2, pv2, pw2 = self._rows(pending, 2)
            self._insert_pairs(sk1, sv1, sw1, pk2, pv2, pw2)
            self._insert_pairs(pk1, pv1, pw1, sk2, sv2, sw2)
        if evicted.stop > evicted.start:
            # Pairs with an evicted token and a token still exact (or evicted now): exact rows.
            rest = torch.cat([torch.arange(evicted.start), torch.arange(evicted.stop, Ne)]).to(self.device)
            ek1, ev1, ew1 = self._rows(evicted, 1)
            ek2, ev2, ew2 = self._rows(evicted, 2)
            ak2, av2, aw2 = self._rows(slice(None), 2)
            rk1, rv1, rw1 = (t[:, :, rest] for t in self._rows(slice(None), 1))
            self._insert_pairs(ek1, ev1, ew1, ak2, av2, aw2)
            self._insert_pairs(rk1, rv1, rw1, ek2, ev2, ew2)
            _insert_chunked(self.sources[0], ek1, ev1, ew1)
            _insert_chunked(self.sources[1], ek2, ev2, ew2)

    def _insert_pairs(self, k1, v1, w1, k2, v2, w2) -> None:
        """Insert the rows of all pairs (a from the first set, b from the second) into the pair summary."""
        B, H, R1, D = k1.shape
        R2 = k2.shape[2]
        if R1 == 0 or R2 == 0:
            return
        # Materialise the Kronecker rows a few first-stream rows at a time, to bound memory.
        step = max(1, INSERT_ELEMENTS // max(1, B * H * R2 * D))
        for i in range(0, R1, step):
            a = slice(i, i + step)
            n = k1[:, :, a].shape[2]
            keys = (k1[:, :, a, None] * k2[:, :, None]).reshape(B, H, n * R2, D)  # [B, H, n·R2, D]
            values = (v1[:, :, a, None] * v2[:, :, None]).reshape(B, H, n * R2, D)
            weights = (w1[:, :, a, None] * w2[:, :, None]).reshape(B, H, n * R2)
            _insert_chunked(self.pairs, keys, values, weights)

    def check_windows(self) -> None:
        super().check_windows()
        w1, w2 = self.constants.w1, self.constants.w2
        if (w1 is None) != (w2 is None):
            raise ValueError(
                f"cache_implementation={self.layout_name!r} supports windowed models only with both w1 and w2 set "
                f"(its pair summary mixes pairs inside and outside a single window), got w1={w1}, w2={w2}"
            )

    def _parts(self, q, lw1, lw2):
        scale, w1 = self.constants.scale, self.constants.w1
        B, H, Tq, _ = q.shape
        k1, v1, _ = self._rows(slice(None), 1)
        k2, v2, _ = self._rows(slice(None), 2)
        exact = weighted_pair_sums(q, k1, lw1, k2, lw2, scale=scale, v1=v1, v2=v2)
        nums, dens = [exact], [exact]
        if w1 is not None:  # both windows, both inside the exact window: nothing summarised is visible
            return nums, dens
        # Pairs of pending tokens with tokens summarised before them: not yet in the pair summary.
        Ne = self.keys.shape[2]
        pending = slice(Ne - self.n_pending, Ne)
        sk1, sv1, sw1 = self.sources[0].source_rows()
        sk2, sv2, sw2 = self.sources[1].source_rows()
        s1 = log_weights(sw1)[:, :, None].expand(B, H, Tq, -1)
        s2 = log_weights(sw2)[:, :, None].expand(B, H, Tq, -1)
        if self.n_pending:
            cross = [
                weighted_pair_sums(q, sk1, s1, k2[:, :, pending], lw2[..., pending], scale=scale, v1=sv1, v2=v2[:, :, pending]),
                weighted_pair_sums(q, k1[:, :, pending], lw1[..., pending], sk2, s2, scale=scale, v1=v1[:, :, pending], v2=sv2),
            ]
            nums, dens = nums + cross, dens + cross
        if self.pairs.numerator == "cluster_sum":
            pk, pv, pw = self.pairs.cluster_rows()
            part = weighted_row_sums(q, pk, log_weights(pw)[:, :, None], scale=scale, v=pv)
            return nums + [part], dens + [part]
        nk, nv, nw = self.pairs.l2_rows()
        dk, _, dw = self.pairs.reservoir_rows()
        nums.append(weighted_row_sums(q, nk, log_weights(nw)[:, :, None], scale=scale, v=nv))
        dens.append(weighted_row_sums(q, dk, log_weights(dw)[:, :, None], scale=scale))
        return nums, dens


class StandardSubGenCacheLayer(_SubGenLayer):
    """SubGen for a standard (softmax) attention layer: an exact window plus one summary of its (k, v) stream.
    Built by `TensorAttnCache` for every standard layer when `cache_config["standard_layers"] == "subgen"`; takes the
    tensor layers' SubGen options. Constants: the standard layer's score scale (1/sqrt(head_dim)), no windows."""

    layout_name = "standard_layers='subgen'"
    stream_count = 1

    def _init_summaries(self, B, H, D):
        self.summary = self._summary(B, H, D)

    def _summaries(self):
        return [self.summary]

    def _summarise(self, evicted):
        _insert_chunked(self.summary, *self._rows(evicted, 1))

    def _exact(self, query):
        # The estimator over exact rows alone (log-weights 0 / -inf) is exact softmax attention.
        return self._estimate_blocks(query)

    def _parts(self, q, lw, _unused):
        scale = self.constants.scale
        k, v, _ = self._rows(slice(None), 1)
        exact = weighted_row_sums(q, k, lw, scale=scale, v=v)  # [B, H, Tq, D]
        if self.summary.numerator == "cluster_sum":
            sk, sv, sw = self.summary.cluster_rows()
            part = weighted_row_sums(q, sk, log_weights(sw)[:, :, None], scale=scale, v=sv)
            return [exact, part], [exact, part]
        nk, nv, nw = self.summary.l2_rows()
        dk, dw = self.summary.denominator_rows()
        num = weighted_row_sums(q, nk, log_weights(nw)[:, :, None], scale=scale, v=nv)
        den = weighted_row_sums(q, dk, log_weights(dw)[:, :, None], scale=scale)
        return [exact, num], [exact, den]


for _layout in (SubGen4CacheLayer, SubGen2CacheLayer):
    _layout.standard_layer = StandardSubGenCacheLayer  # what cache_config["standard_layers"] = "subgen" builds

__all__ = ["StandardSubGenCacheLayer", "SubGen2CacheLayer", "SubGen4CacheLayer"]
