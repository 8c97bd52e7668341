"""SubGen's summary of one stream of (key, value) rows: online δ-clusters, per-cluster reservoirs,
ℓ2-norm value samplers and per-cluster value sums, batched over [B, H] and deterministic given a `torch.Generator`.

A summary turns a stream of rows into a small set of weighted rows (key, value, weight) such that
`Σ_rows weight·exp(score(key))·value` estimates the same sum over the stream:

- ``numerator="sampled"`` (paper-faithful SubGen): Z from the cluster reservoirs, `count_c / |R_c|` per
  sampled key, unbiased; N from `value_samples` independent ℓ2 samplers that keep a row with probability
  ∝ w·‖v‖², importance-weighted by μ / (s·‖v‖²), unbiased.
- ``numerator="cluster_sum"`` (the variant): one row per cluster, its mean key, mean value and total weight.
  Deterministic; inside a δ-cluster every key scores within δ·‖q‖ of the mean.

Rows may carry a multiplicity weight (the two-layout summary receives rows that stand for several pairs).
Reservoirs then use priority sampling (Duffield, Lund & Thorup 2007): priority w/u, keep the top t, and weight a
kept row by max(w, τ) with τ the largest priority ever dropped; unbiased per row and exact while a cluster holds
at most t rows. With unit weights the kept set is a uniform sample, and `count / |R|` is used instead (lower
variance, still unbiased). The estimators that read these rows are stateless: `ops.subgen`.

A cap (`max_clusters`) bounds the memory of a summary for any stream: after each insert, while a head holds more
clusters than the cap, its two nearest clusters (by center) are merged into one, and that head's radius grows to
the distance of the merged pair, so that later keys join the coarser clusters instead of opening new ones.
A merge is exact bookkeeping for every estimator: counts and sums add; two priority-sampled reservoirs merge into
the top-t priorities of their union, which is the reservoir the union would have had (priorities are drawn
independently per row); τ becomes the largest priority either dropped. What a merge costs is resolution: the
merged cluster's keys are scored through one mean key (cluster sums) or one shared reservoir.
"""

from __future__ import annotations

import math

import torch

from ..ops.subgen.clustering import assign_clusters, nearest_cluster_pair
from ..ops.subgen.estimators import NUMERATORS

# State tensors without a cluster dimension (everything else is [B, H, C, ...]).
PER_HEAD = ("n_clusters", "radius", "l2_keys", "l2_values", "l2_mass")


class StreamSummary:
    """SubGen summary of a stream of weighted (key, value) rows, for every [B, H].

    Args:
        delta: clustering radius (l2 on keys); 0 puts every distinct key in its own cluster.
        numerator: "sampled" or "cluster_sum" (see the module docstring).
        cluster_samples: reservoir size t per cluster ("sampled").
        value_samples: number s of independent ℓ2 samplers ("sampled"); 0 keeps none.
        reservoir_values: also keep each reservoir key's value (the two layout generates rows from them).
        weighted: rows may carry weights other than 0/1 (priority-sampling estimator instead of count/|R|).
        generator: the `torch.Generator` every random draw comes from.
        max_clusters: at most this many clusters per head (None: unbounded); see the module docstring.
    """

    def __init__(self, batch, heads, dim, *, delta, numerator, cluster_samples, value_samples, dtype, device,
                 generator, reservoir_values=False, weighted=False, max_clusters=None):
        if numerator not in NUMERATORS:
            raise ValueError(f"`numerator` must be one of {NUMERATORS}, got {numerator!r}")
        self.delta, self.numerator, self.weighted = float(delta), numerator, weighted
        self.max_clusters = None
        self.t, self.s = int(cluster_samples), int(value_samples) if numerator == "sampled" else 0
        self.reservoir_values = reservoir_values
        self.generator = generator
        z = dict(dtype=dtype, device=device)
        B, H, D = batch, heads, dim
        self.state: dict[str, torch.Tensor] = {
            "centers": torch.zeros(B, H, 0, D, **z),
            "counts": torch.zeros(B, H, 0, **z),
            "n_clusters": torch.zeros(B, H, dtype=torch.long, device=device),
            "radius": torch.full((B, H), self.delta, **z),  # grows where merges happen
        }
        if numerator == "cluster_sum":
            self.state["key_sums"] = torch.zeros(B, H, 0, D, **z)
            self.state["value_sums"] = torch.zeros(B, H, 0, D, **z)
        else:
            self.state["res_keys"] = torch.zeros(B, H, 0, self.t, D, **z)
            self.state["res_prio"] = torch.zeros(B, H, 0, self.t, **z)  # 0: empty slot
            if reservoir_values:
                self.state["res_values"] = torch.zeros(B, H, 0, self.t, D, **z)
            if weighted:
                self.state["res_w"] = torch.zeros(B, H, 0, self.t, **z)
                self.state["res_tau"] = torch.zeros(B, H, 0, **z)
            if self.s:
                self.state["l2_keys"] = torch.zeros(B, H, self.s, D, **z)
                self.state["l2_values"] = torch.zeros(B, H, self.s, D, **z)
                self.state["l2_mass"] = torch.zeros(B, H, **z)  # μ = Σ w·‖v‖² so far
        if max_clusters is not None:
            self.limit(max_clusters)

    # -- bookkeeping -------------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.state["centers"].shape[2]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())

    def fixed_bytes(self) -> int:
        """Bytes that do not depend on the number of clusters (per-head counters, ℓ2 samplers)."""
        return sum(t.numel() * t.element_size() for k, t in self.state.items() if k in PER_HEAD)

    def cluster_bytes(self) -> int:
        """Bytes of one more cluster slot (every head of every row holds it)."""
        total = 0
        for k, t in self.state.items():
            if k not in PER_HEAD:
                total += math.prod(t.shape[:2]) * math.prod(t.shape[3:]) * t.element_size()
        return total

    def limit(self, max_clusters: int) -> None:
        """Hold at most `max_clusters` clusters per head from now on (merging down to it now if needed)."""
        if isinstance(max_clusters, bool) or not isinstance(max_clusters, int) or max_clusters < 1:
            raise ValueError(f"`max_clusters` must be an int >= 1, got {max_clusters!r}")
        self.max_clusters = max_clusters
        self._merge_down()

    def apply(self, fn) -> None:
        """Apply `fn` (index_select, repeat_interleave, .to, ...) to every state tensor; all are batch-first."""
        self.state = {k: fn(v) for k, v in self.state.items()}

    def _grow(self, need: int) -> None:
        """Make room for `need` clusters, doubling so that growth is amortised."""
        cap = self.capacity
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 4)
        if self.max_clusters is not None:  # never more slots than the cap, beyond what this insert needs
            new_cap = min(new_cap, max(need, self.max_clusters))
        for name, t in self.state.items():
            if name in PER_HEAD:
                continue
            pad = list(t.shape)
            pad[2] = new_cap - cap
            self.state[name] = torch.cat([t, t.new_zeros(pad)], dim=2)

    # -- insertion ---------------------------------------------------------------------------------------------

    def insert(self, keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor) -> None:
        """Add rows keys, values [B, H, R, D] with multiplicities weights [B, H, R] (0: the row is absent)."""
        if keys.shape[2] == 0:
            return
        m = self.max_clusters
        if m is not None and keys.shape[2] > m:  # at most m new clusters at a time, so slots stay under 2m
            for i in range(0, keys.shape[2], m):
                self.insert(keys[:, :, i : i + m], values[:, :, i : i + m], weights[:, :, i : i + m])
            return
        st = self.state
        valid = weights > 0
        assign, new_centers, opened = assign_clusters(keys, valid, st["centers"], st["n_clusters"], st["radius"])
        n_old = st["n_clusters"]
        self._grow(int((n_old + opened).max()))
        st = self.state
        B, H, R, D = keys.shape
        # Write the centers of the opened clusters into slots n_old .. n_old + opened - 1 (only those rows: a step
        # that opens one cluster writes D numbers, whatever the summary holds).
        b, h, j = (torch.arange(R, device=keys.device) < opened[..., None]).nonzero(as_tuple=True)
        st["centers"][b, h, n_old[b, h] + j] = new_centers[b, h, j]
        st["n_clusters"] = n_old + opened

        idx = assign.clamp_min(0)  # absent rows add weight 0 to cluster 0
        w = torch.where(valid, weights, torch.zeros_like(weights))
        st["counts"].scatter_add_(2, idx, w)
        if self.numerator == "cluster_sum":
            st["key_sums"].scatter_add_(2, idx[..., None].expand(B, H, R, D), keys * w[..., None])
            st["value_sums"].scatter_add_(2, idx[..., None].expand(B, H, R, D), values * w[..., None])
        else:
            self._insert_reservoirs(keys, values, w, assign)
            if self.s:
                self._insert_l2(keys, values, w)
        self._merge_down()

    # -- the cap -----------------------------------------------------------------------------------------------

    def _merge_down(self) -> None:
        """Merge nearest pairs until no head holds more than `max_clusters` clusters; then release extra slots."""
        m = self.max_clusters
        if m is None:
            return
        while bool((self.state["n_clusters"] > m).any()):
            self._merge_nearest(self.state["n_clusters"] > m)
        if self.capacity > m:
            self.state = {k: (t if k in PER_HEAD else t[:, :, :m].contiguous()) for k, t in self.state.items()}

    def _merge_nearest(self, active: torch.Tensor) -> None:
        """In each head where `active` [B, H], merge cluster j into cluster i (its nearest pair, i < j), then move
        the last cluster into slot j so that the clusters in use stay the first n_clusters."""
        st = self.state
        i, j, dist2 = nearest_cluster_pair(st["centers"], st["n_clusters"])
        last = (st["n_clusters"] - 1).clamp_min(0)
        ci, cj = _take(st["counts"], i), _take(st["counts"], j)
        total = ci + cj
        share = torch.where(total > 0, ci / torch.where(total > 0, total, torch.ones_like(total)), 0.5)[..., None]
        merged = {
            "counts": total,
            "centers": share * _take(st["centers"], i) + (1 - share) * _take(st["centers"], j),
        }
        for name in ("key_sums", "value_sums"):
            if name in st:
                merged[name] = _take(st[name], i) + _take(st[name], j)
        if "res_prio" in st:
            prio = torch.cat([_take(st["res_prio"], i), _take(st["res_prio"], j)], -1)  # [B, H, 2t]
            top_prio, top = prio.topk(self.t + 1, dim=-1)
            keep = top[..., : self.t]
            merged["res_prio"] = top_prio[..., : self.t]
            for name in ("res_keys", "res_values", "res_w"):
                if name in st:
                    both = torch.cat([_take(st[name], i), _take(st[name], j)], 2)  # [B, H, 2t, ...]
                    merged[name] = both.gather(2, keep.view(*keep.shape, *[1] * (both.dim() - 3)).expand(
                        *keep.shape, *both.shape[3:]))
            if "res_tau" in st:
                merged["res_tau"] = torch.maximum(torch.maximum(_take(st["res_tau"], i), _take(st["res_tau"], j)),
                                                  top_prio[..., self.t])
        for name, t in st.items():
            if name in PER_HEAD:
                continue
            _put(t, i, merged[name], active)
            _put(t, j, _take(t, last), active)  # the last cluster moves into the freed slot (a no-op when j is last)
            _put(t, last, torch.zeros_like(merged[name]), active)
        st["n_clusters"] = st["n_clusters"] - active.long()
        st["radius"] = torch.where(active, torch.maximum(st["radius"], dist2.clamp_min(0).sqrt().to(st["radius"].dtype)),
                                   st["radius"])

    def _uniform(self, shape, like) -> torch.Tensor:
        """U(0, 1] draws from the summary's generator."""
        return 1.0 - torch.rand(shape, generator=self.generator, dtype=like.dtype, device=like.device)

    def _insert_reservoirs(self, keys, values, w, assign) -> None:
        """Priority-sample the rows into their clusters' reservoirs: keep the t largest priorities w/u per cluster."""
        st = self.state
        B, H, R, D = keys.shape
        C, t = self.capacity, self.t
        prio = w / self._uniform((B, H, R), keys)  # 0 for absent rows
        bucket = torch.where(assign >= 0, assign, C)  # absent rows go to a dummy bucket C
        # Rank each row among the rows of its cluster by priority (descending).
        by_prio = torch.argsort(prio, dim=-1, descending=True, stable=True)
        by_bucket = torch.argsort(bucket.gather(-1, by_prio), dim=-1, stable=True)
        order = by_prio.gather(-1, by_bucket)  # [B, H, R]: rows grouped by cluster, largest priority first
        sorted_bucket = bucket.gather(-1, order)
        per_bucket = torch.zeros(B, H, C + 1, dtype=torch.long, device=keys.device)
        per_bucket.scatter_add_(2, bucket, torch.ones_like(bucket))
        starts = per_bucket.cumsum(-1) - per_bucket
        rank_sorted = torch.arange(R, device=keys.device) - starts.gather(-1, sorted_bucket)
        rank = torch.empty_like(rank_sorted).scatter_(-1, order, rank_sorted)  # [B, H, R]

        # The best t new rows of each cluster become candidates; a row beyond them can only raise τ.
        take = (rank < t) & (assign >= 0)
        flat = torch.where(take, bucket * t + rank, (C + 1) * t)  # one trash slot past the end
        n_slots = (C + 1) * t + 1
        cand_prio = prio.new_zeros(B, H, n_slots).scatter_(2, flat, prio)
        cand_keys = keys.new_zeros(B, H, n_slots, D).scatter_(2, flat[..., None].expand(B, H, R, D), keys)
        cand_prio = cand_prio[..., : C * t].reshape(B, H, C, t)
        cand_keys = cand_keys[..., : C * t, :].reshape(B, H, C, t, D)
        merged_prio = torch.cat([st["res_prio"], cand_prio], dim=-1)  # [B, H, C, 2t]
        merged_keys = torch.cat([st["res_keys"], cand_keys], dim=-2)
        top_prio, top = merged_prio.topk(t + 1, dim=-1)  # t kept, and the largest dropped one
        keep = top[..., :t]
        st["res_prio"] = top_prio[..., :t].contiguous()
        st["res_keys"] = merged_keys.gather(-2, keep[..., None].expand(B, H, C, t, D))
        if self.reservoir_values:
            cand_vals = values.new_zeros(B, H, n_slots, D).scatter_(2, flat[..., None].expand(B, H, R, D), values)
            cand_vals = cand_vals[..., : C * t, :].reshape(B, H, C, t, D)
            merged_vals = torch.cat([st["res_values"], cand_vals], dim=-2)
            st["res_values"] = merged_vals.gather(-2, keep[..., None].expand(B, H, C, t, D))
        if self.weighted:
            cand_w = w.new_zeros(B, H, n_slots).scatter_(2, flat, w)[..., : C * t].reshape(B, H, C, t)
            st["res_w"] = torch.cat([st["res_w"], cand_w], dim=-1).gather(-1, keep)
            beyond = torch.where((rank >= t) & (assign >= 0), prio, torch.zeros_like(prio))
            tau = prio.new_zeros(B, H, C + 1).scatter_reduce_(2, bucket, beyond, reduce="amax")[..., :C]
            st["res_tau"] = torch.maximum(st["res_tau"], torch.maximum(tau, top_prio[..., t]))

    def _insert_l2(self, keys, values, w) -> None:
        """Each of the s independent samplers keeps one row with probability ∝ w·‖v‖² over the whole stream."""
        st = self.state
        B, H, R, D = keys.shape
        mass = w * (values * values).sum(-1)  # [B, H, R]
        batch_mass = mass.sum(-1)  # [B, H]
        new_total = st["l2_mass"] + batch_mass
        has = batch_mass > 0
        probs = torch.where(has[..., None], mass, torch.ones_like(mass)).reshape(B * H, R)
        pick = torch.multinomial(probs, self.s, replacement=True, generator=self.generator).reshape(B, H, self.s)
        # Replacing with probability batch_mass / new_total keeps each sampler ∝ w·‖v‖² over the whole stream.
        ratio = torch.where(has, batch_mass / torch.where(has, new_total, torch.ones_like(new_total)), 0.0)
        swap = self._uniform((B, H, self.s), keys) <= ratio[..., None]  # [B, H, s]
        idx = pick[..., None].expand(B, H, self.s, D)
        st["l2_keys"] = torch.where(swap[..., None], keys.gather(2, idx), st["l2_keys"])
        st["l2_values"] = torch.where(swap[..., None], values.gather(2, idx), st["l2_values"])
        st["l2_mass"] = new_total

    # -- the summary as weighted rows ------------------------------------------------------------------------

    def _used(self) -> int:
        return int(self.state["n_clusters"].max()) if self.capacity else 0

    def cluster_rows(self):
        """("cluster_sum") one row per cluster: (mean key, mean value, weight = total weight), [B, H, C, ...]."""
        st, C = self.state, self._used()
        counts = st["counts"][..., :C]
        div = torch.where(counts > 0, counts, torch.ones_like(counts))[..., None]
        return st["key_sums"][..., :C, :] / div, st["value_sums"][..., :C, :] / div, counts

    def reservoir_rows(self):
        """("sampled") every reservoir slot as a row: (key, value or None, estimator weight), [B, H, C·t, ...]."""
        st, C = self.state, self._used()
        B, H = st["counts"].shape[:2]
        prio = st["res_prio"][..., :C, :]
        filled = prio > 0  # [B, H, C, t]
        if self.weighted:
            weight = torch.maximum(st["res_w"][..., :C, :], st["res_tau"][..., :C, None])
        else:
            n_kept = filled.sum(-1, keepdim=True).clamp_min(1)
            weight = (st["counts"][..., :C, None] / n_kept).expand_as(prio)
        weight = torch.where(filled, weight, torch.zeros_like(weight)).reshape(B, H, C * self.t)
        D = st["res_keys"].shape[-1]  # explicit: the reshape of an empty summary (C = 0) cannot infer it
        keys = st["res_keys"][..., :C, :, :].reshape(B, H, C * self.t, D)
        values = st["res_values"][..., :C, :, :].reshape(B, H, C * self.t, D) if self.reservoir_values else None
        return keys, values, weight

    def l2_rows(self):
        """("sampled") the ℓ2 samplers as rows: (key, value, importance weight μ / (s·‖v‖²)), [B, H, s, ...]."""
        st = self.state
        norm2 = (st["l2_values"] * st["l2_values"]).sum(-1)  # [B, H, s]
        ok = (norm2 > 0) & (st["l2_mass"][..., None] > 0)
        weight = torch.where(ok, st["l2_mass"][..., None] / (self.s * torch.where(ok, norm2, torch.ones_like(norm2))), 0.0)
        return st["l2_keys"], st["l2_values"], weight

    def denominator_rows(self):
        """(keys, weights) whose weighted exp-scores estimate the stream's part of Z."""
        if self.numerator == "cluster_sum":
            k, _, w = self.cluster_rows()
            return k, w
        k, _, w = self.reservoir_rows()
        return k, w

    def numerator_rows(self):
        """(keys, values, weights) whose weighted exp-scores times values estimate the stream's part of N."""
        if self.numerator == "cluster_sum":
            return self.cluster_rows()
        return self.l2_rows()

    def source_rows(self):
        """(keys, values, weights) standing for the stream's rows in both Z and N: what the two layout pairs new
        tokens with. Needs `reservoir_values` in "sampled" mode."""
        if self.numerator == "cluster_sum":
            return self.cluster_rows()
        return self.reservoir_rows()


def _index(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """idx [B, H] as an index into dimension 2 of t [B, H, C, ...], shaped for gather/scatter."""
    return idx.view(*idx.shape, 1, *[1] * (t.dim() - 3)).expand(*idx.shape, 1, *t.shape[3:])


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[b, h, idx[b, h]] for every head: [B, H, ...]."""
    return t.gather(2, _index(t, idx)).squeeze(2)


def _put(t: torch.Tensor, idx: torch.Tensor, value: torch.Tensor, where: torch.Tensor) -> None:
    """t[b, h, idx[b, h]] = value[b, h] in the heads where `where` [B, H] holds (in place)."""
    keep = _take(t, idx)
    mask = where.view(*where.shape, *[1] * (value.dim() - 2))
    t.scatter_(2, _index(t, idx), torch.where(mask, value.to(t.dtype), keep).unsqueeze(2))


__all__ = ["StreamSummary"]
