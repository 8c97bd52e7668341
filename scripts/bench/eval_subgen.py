"""Evaluate SubGen eviction (cache_implementation "subgen4" / "subgen2") against exact tensor attention and the
eviction everyone already uses: a recent window, sinks + window (StreamingLLM-style) and random eviction, at equal
memory.

    python -m scripts.bench.eval_subgen                          # all three parts, full sizes
    python -m scripts.bench.eval_subgen --quick --out /tmp/sg    # tiny sizes, for a smoke run

(a) synthetic (m, δ)-clusterable keys: relative error ‖Ô−O‖/‖O‖, the Lemma 5.1 ratio
    ‖Ô−O‖ / (‖softmax(K̃q)‖₂·‖Ṽ‖_op) and memory against n, for i.i.d. clusters, clusters that appear in phases
    (the query wants the first phase) and an early needle;
(b) a tiny tensor-attention model trained here on a recall task whose answers sit far back, decoded token by token
    through each cache (teacher-forced): answer loss / accuracy against cache memory;
(c) the low-dimensional claim: keys uniform in the unit ball, the largest δ reaching a fixed error, its memory
    against d and against n.

Writes synthetic.csv, model.csv, lowdim.csv (the parts run), run.json, eval_subgen.png (when all three parts run)
and tables.md (= `render(out)`, the publishing convention of scripts/bench/harness.py) to --out (default
docs/eval_subgen/ for a full run, runs/bench/eval_subgen/ for --quick or some parts only);
`python -m scripts.bench.eval_subgen --from-csv` rebuilds docs/eval_subgen/tables.md from those files.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a file: make `scripts.bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

# Importing the package also registers "tensor_attn" with the Auto classes, which train_model uses.
from hf_tensor_attn.cache import (
    SubGen2CacheLayer, SubGen4CacheLayer, TensorAttnCache, TensorAttnCacheLayer, TensorAttnConstants,
)
from hf_tensor_attn.ops import four_cache_decode, tensor_attention
from scripts.bench.harness import (
    describe_load, load_snapshot, machine, markdown_table, output_dir, publish, pyplot, read_csv, read_run_record,
    render_document, run_record, write_csv, write_run_record,
)
from scripts.bench.metrics import kron_value_op_norm, lemma51_ratio

NAME = "eval_subgen"
MODULE = "scripts.bench.eval_subgen"
TITLE = "SubGen eviction against exact attention and eviction baselines"
CSV_OF_PART = {"a": "synthetic.csv", "b": "model.csv", "c": "lowdim.csv"}
# The run's settings that render() needs, saved in run.json.
SETTINGS = ("parts", "threads", "train_steps", "seq_len", "eval_batch", "model_deltas", "lowdim_target",
            "lowdim_q_norm", "sizes")
LAYERS = {"subgen4": SubGen4CacheLayer, "subgen2": SubGen2CacheLayer}
SINKS, WINDOW = 4, 32
ELEM = 4  # float32 bytes: every cache here holds float32
# (a): clusters per stream, their delta, and the SubGen settings every synthetic stream is run with.
SYN_CLUSTERS, SYN_DELTA, SYN_Q_NORM = 16, 0.3, 2.0
SYN_SUBGEN = dict(delta=SYN_DELTA, recent_window=WINDOW, sink_tokens=SINKS, cluster_samples=8, value_samples=64)
BUDGET_FACTOR = 2  # "subgen4/budget": budget_bytes per layer, in multiples of its exact window's bytes
# (c): the δ sweep, largest first.
LOWDIM_DELTAS = [1.0, 0.7, 0.5, 0.35, 0.25, 0.18]
SIZES = {
    "full": dict(a_ns=[1024, 4096, 16384], a_n2_max=4096, a_dims=[8, 32], b_windows=[4, 16],
                 b_tokens=[8, 16, 24, 32, 48], c_ns=[1024, 4096, 16384], c_dims=[2, 3, 4, 6]),
    "quick": dict(a_ns=[256, 512], a_n2_max=256, a_dims=[8], b_windows=[4], b_tokens=[8, 16], c_ns=[256, 512],
                  c_dims=[2, 3]),
}
# --quick also shrinks (b)'s model run to seconds.
QUICK_B = dict(train_steps=10, seq_len=24, eval_batch=8, model_deltas=[2.0])


# ---------------------------------------------------------------------------------------------------------------
# Exact attention for one query over a long sequence, in blocks of the first stream
# ---------------------------------------------------------------------------------------------------------------


def exact_decode(q, k1, k2, v1, v2, block=512):
    """o [D] and ‖P‖₂ of the pair softmax for one query q [D] over [n, D] streams (float64, O(block·n) memory)."""
    n = k1.shape[0]
    m, z, z2, num = -math.inf, 0.0, 0.0, torch.zeros_like(q)
    # Two passes: the max first, so that Σ P² and the sums need no rescaling.
    for a in range(0, n, block):
        m = max(m, float(((k1[a : a + block] * q) @ k2.T).max()))
    for a in range(0, n, block):
        p = torch.exp((k1[a : a + block] * q) @ k2.T - m)  # [block, n]
        z += float(p.sum())
        z2 += float((p * p).sum())
        num += (v1[a : a + block] * (p @ v2)).sum(0)
    return num / z, math.sqrt(z2) / z


def attend_over(q, k1, k2, v1, v2):
    """Exact tensor attention of q [D] over kept tokens only (what an eviction baseline computes)."""
    return four_cache_decode(q[None, None, None], k1[None, None], k2[None, None], v1[None, None], v2[None, None],
                             scale=1.0)[0, 0, 0]


# ---------------------------------------------------------------------------------------------------------------
# (a) synthetic streams
# ---------------------------------------------------------------------------------------------------------------


def make_stream(kind: str, n: int, d: int, m: int, delta: float, seed: int, q_norm: float = 2.0):
    """q [d], k [n, 2d] (k1 | k2), v [n, 2d], float64. Each stream's keys lie within delta/2 of one of m centers
    with N(0, 1) entries, so the keys are (m, delta)-clusterable; values have mean 1.

    iid: cluster labels uniform over time, q random. phases: four phases, each using its own quarter of the
    clusters; q aligned with the first cluster pair of phase 0, the oldest. needle: one token at position 16
    whose keys are 3x the (otherwise unused) cluster-0 centers and whose value is -2; q aligned with it.
    spread: the adversary, i.i.d. N(0, I) keys (pairwise about sqrt(2d) apart: no δ below that clusters them), q
    random.
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "spread":
        k = torch.randn(n, 2 * d, generator=g, dtype=torch.float64)
        v = 1 + 0.5 * torch.randn(n, 2 * d, generator=g, dtype=torch.float64)
        q = torch.randn(d, generator=g, dtype=torch.float64)
        return q_norm * q / q.norm(), k, v
    centers = [torch.randn(m, d, generator=g, dtype=torch.float64) for _ in range(2)]

    def labels():
        if kind == "phases":
            phase = torch.arange(n) * 4 // n
            return phase * (m // 4) + torch.randint(0, m // 4, (n,), generator=g)
        low = 1 if kind == "needle" else 0
        return torch.randint(low, m, (n,), generator=g)

    def keys(c):
        noise = torch.randn(n, d, generator=g, dtype=torch.float64)
        radius = torch.rand(n, 1, generator=g, dtype=torch.float64) * delta / 2
        return c[labels()] + noise / noise.norm(dim=-1, keepdim=True) * radius

    k1, k2 = keys(centers[0]), keys(centers[1])
    v = 1 + 0.5 * torch.randn(n, 2 * d, generator=g, dtype=torch.float64)
    if kind == "iid":
        q = torch.randn(d, generator=g, dtype=torch.float64)
    else:
        q = centers[0][0] * centers[1][0]
    if kind == "needle":
        k1[16], k2[16], v[16] = 3 * centers[0][0], 3 * centers[1][0], -2.0
    return q_norm * q / q.norm(), torch.cat([k1, k2], -1), v


def run_subgen(layout, cfg, q, k, v, chunk):
    """Feed the stream through a cache layer (float32, chunked prefill, the last token as the decode step)."""
    layer = LAYERS[layout](TensorAttnConstants(scale=1.0), **cfg)
    n = k.shape[0]
    k32, v32 = k.float()[None, None], v.float()[None, None]
    for start in range(0, n - 1, chunk):
        stop = min(start + chunk, n - 1)
        layer.update(k32[:, :, start:stop], v32[:, :, start:stop])  # eviction runs at the next update
    layer.update(k32[:, :, n - 1 :], v32[:, :, n - 1 :])
    out = layer.attend(q.float()[None, None, None])[0, 0, 0].double()
    return out, layer.memory_bytes()


def random_eviction_kept(n: int, budget: int, seed: int) -> torch.Tensor:
    """Indices kept by evicting a uniformly random held token whenever more than `budget` are held."""
    g = torch.Generator().manual_seed(seed)
    held = list(range(min(budget, n)))
    for t in range(budget, n):
        # The newest token is never the one evicted: the step that adds it also attends with it.
        held[int(torch.randint(0, budget, (1,), generator=g))] = t
    return torch.tensor(sorted(held))


def baseline_kept(method: str, n: int, tokens: int, seed: int) -> torch.Tensor:
    tokens = max(1, min(tokens, n))
    if method == "window":
        return torch.arange(n - tokens, n)
    if method == "sinks+window":
        sinks = min(SINKS, tokens - 1)
        return torch.cat([torch.arange(sinks), torch.arange(n - (tokens - sinks), n)])
    return random_eviction_kept(n, tokens, seed)


def part_a(args, rows_out):
    sizes = args.sizes
    for kind in ("iid", "phases", "needle", "spread"):
        for d in sizes["a_dims"]:
            for n in sizes["a_ns"]:
                if kind == "spread" and n > sizes["a_n2_max"]:
                    continue  # a fixed δ keeps every key of it: the pair sums over n x n clusters outgrow memory
                q, k, v = make_stream(kind, n, d, SYN_CLUSTERS, SYN_DELTA, seed=0, q_norm=SYN_Q_NORM)
                k1, k2 = k.chunk(2, -1)
                v1, v2 = v.chunk(2, -1)
                t0 = time.time()
                o, p_l2 = exact_decode(q, k1, k2, v1, v2)
                v_op = float(kron_value_op_norm(v1, v2))

                def record(method, out, mem, secs):
                    rows_out.append(dict(stream=kind, d=d, n=n, method=method, memory_bytes=mem,
                                         rel_error=float((out - o).norm() / o.norm()),
                                         lemma51_ratio=float(lemma51_ratio(out, o, p_l2, v_op)), seconds=round(secs, 2)))

                budgets = {}
                for layout in ("subgen4", "subgen2"):
                    if layout == "subgen2" and (n > sizes["a_n2_max"] or d > 8 or kind == "spread"):
                        continue  # its update cost grows with (pair clusters x exact tokens): see docs/eval_subgen.md
                    for numerator in ("cluster_sum", "sampled"):
                        if layout == "subgen2" and numerator == "sampled" and n > sizes["a_n2_max"] // 4:
                            continue
                        if kind == "spread" and numerator == "sampled":
                            continue  # reservoirs of n clusters, paired: memory beyond any machine here
                        cfg = dict(SYN_SUBGEN, numerator=numerator, seed=0)
                        t1 = time.time()
                        out, mem = run_subgen(layout, cfg, q, k, v, chunk=256 if layout == "subgen4" else 64)
                        record(f"{layout}/{numerator}", out, mem, time.time() - t1)
                        if layout == "subgen4":
                            budgets[numerator] = mem
                # The adaptive variant: a hard byte budget, BUDGET_FACTOR x what its exact window alone needs.
                cfg = dict(SYN_SUBGEN, numerator="cluster_sum", seed=0, budget_bytes=BUDGET_FACTOR * (SINKS + WINDOW)
                           * 4 * d * ELEM)
                t1 = time.time()
                out, mem = run_subgen("subgen4", cfg, q, k, v, chunk=256)
                record("subgen4/budget", out, mem, time.time() - t1)
                budgets["budget"] = mem
                for numerator, mem in budgets.items():
                    tokens = mem // (4 * d * ELEM)  # a kept token holds k1, k2, v1, v2
                    for method in ("window", "sinks+window", "random"):
                        kept = baseline_kept(method, n, tokens, seed=0)
                        out = attend_over(q, k1[kept], k2[kept], v1[kept], v2[kept])
                        record(f"{method}@{numerator}", out, tokens * 4 * d * ELEM, 0.0)
                print(f"(a) {kind:6s} d={d:2d} n={n:5d}: {time.time() - t0:5.1f}s", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# (b) a tiny model on a recall task
# ---------------------------------------------------------------------------------------------------------------

N_FILL, N_KEYS, N_VALS = 16, 1, 8
BOS, FILL0 = 0, 1
NEEDLE0 = FILL0 + N_FILL  # needle token k*N_VALS + v: "key k has value v"
QUERY0 = NEEDLE0 + N_KEYS * N_VALS  # "what was the needle of key k?"; the answer copies that needle
VOCAB = QUERY0 + N_KEYS


def recall_batch(B: int, L: int, g: torch.Generator):
    """BOS, filler with one needle per key somewhere in the first half, then each key queried (random order), the
    answer being a copy of its needle, at the very end. Only the answers are labelled: each needs a token at least
    L/2 - 2·N_KEYS back."""
    ids = torch.randint(FILL0, FILL0 + N_FILL, (B, L), generator=g)
    ids[:, 0] = BOS
    labels = torch.full((B, L), -100)
    rows = torch.arange(B)
    vals = torch.randint(0, N_VALS, (B, N_KEYS), generator=g)
    pos = torch.stack([torch.randperm(L // 2 - 1, generator=g)[:N_KEYS] + 1 for _ in range(B)])
    order = torch.stack([torch.randperm(N_KEYS, generator=g) for _ in range(B)])
    for key in range(N_KEYS):
        ids[rows, pos[:, key]] = NEEDLE0 + key * N_VALS + vals[:, key]
    for j in range(N_KEYS):
        key = order[:, j]
        p = L - 2 * N_KEYS + 2 * j
        ids[:, p] = QUERY0 + key
        ids[:, p + 1] = labels[:, p + 1] = NEEDLE0 + key * N_VALS + vals[rows, key]
    return ids, labels


def train_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "tensor_attn", hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        vocab_size=VOCAB, position_embedding_type="none", max_position_embeddings=512, bos_token_id=BOS,
        eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(args.train_steps):
        ids, labels = recall_batch(16, args.seq_len, g)
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"(b) train step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    return model.eval()


class EvictionLayer(TensorAttnCacheLayer):
    """A baseline cache: keep at most `budget` tokens exactly and attend over those as if they were everything.

    policy "window" keeps the most recent, "sinks+window" also the first SINKS, "random" evicts a uniformly random
    held token (never the newest). Not registered as a layout: the evaluation puts it into a cache by hand.
    Eviction runs after each attention, so a step's new tokens are always attended.
    """

    def __init__(self, constants, *, policy: str, budget: int, seed: int = 0):
        super().__init__(constants, policy=policy, budget=budget, seed=seed)
        self.policy, self.budget = policy, budget
        self.generator = torch.Generator().manual_seed(seed)

    def allocate(self, key_states, value_states):
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self.pos = torch.zeros(0, dtype=torch.long)  # absolute position of each held token

    def append(self, key_states, value_states, attention_mask):
        T = key_states.shape[2]
        self.keys = torch.cat([self.keys, key_states], 2)
        self.values = torch.cat([self.values, value_states], 2)
        self.pos = torch.cat([self.pos, torch.arange(self.seen, self.seen + T)])

    def read(self, query, attention_mask):
        k1, k2 = self.keys.chunk(2, -1)
        v1, v2 = self.values.chunk(2, -1)
        attention = four_cache_decode if query.shape[2] == 1 else tensor_attention
        out = attention(query, k1, k2, v1, v2, scale=self.constants.scale)
        self._evict()
        return out

    def _evict(self):
        while self.keys.shape[2] > self.budget:
            n = self.keys.shape[2]
            drop = self._drop(n)
            self._keep(torch.cat([torch.arange(drop), torch.arange(drop + 1, n)]))

    def _drop(self, n: int) -> int:
        """Index of the held token the policy evicts next, of `n` held."""
        if self.policy == "window":
            return 0
        if self.policy == "sinks+window":
            return min(int((self.pos < SINKS).sum()) if n > SINKS else 0, n - 2)
        return int(torch.randint(0, n - 1, (1,), generator=self.generator))

    def _keep(self, keep: torch.Tensor) -> None:
        self.keys, self.values, self.pos = self.keys[:, :, keep], self.values[:, :, keep], self.pos[keep]

    def map_batch(self, fn):
        self.keys, self.values = fn(self.keys), fn(self.values)

    def move(self, device):
        self.keys, self.values = self.keys.to(device), self.values.to(device)

    def memory_bytes(self):
        return 0 if not self.is_initialized else (self.keys.numel() + self.values.numel()) * self.keys.element_size()


@torch.no_grad()
def decode_through(model, cache, ids, labels, prompt=1):
    """Teacher-forced decoding token by token through `cache`; answer loss, accuracy and the cache's peak memory."""
    logits = [model(ids[:, :prompt], cache=cache, use_cache=True).logits]
    peak = cache.memory_bytes()
    for t in range(prompt, ids.shape[1] - 1):
        logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        peak = max(peak, cache.memory_bytes())
    logits = torch.cat(logits, 1)  # [B, L - 1, V]: position t predicts token t + 1
    target = labels[:, 1:]
    sel = target >= 0
    loss = torch.nn.functional.cross_entropy(logits[sel], target[sel])
    acc = (logits[sel].argmax(-1) == target[sel]).float().mean()
    return float(loss), float(acc), peak


def part_b(args, rows_out):
    model = train_model(args)
    g = torch.Generator().manual_seed(1)
    ids, labels = recall_batch(args.eval_batch, args.seq_len, g)
    config = model.config

    def eviction_cache(policy, tokens):
        cache = TensorAttnCache(config, "four_cache")
        cache.layers = [EvictionLayer(cache.constants, policy=policy, budget=tokens) for _ in cache.layers]
        return cache

    def record(method, setting, result):
        loss, acc, peak = result
        # per sequence: the cache holds every row of the batch
        rows_out.append(dict(method=method, setting=setting, memory_bytes_per_seq=peak // args.eval_batch,
                             answer_loss=round(loss, 4), answer_accuracy=round(acc, 4)))
        print(f"(b) {method:24s} {setting:28s} mem/seq {peak // args.eval_batch:7d}  loss {loss:.3f}  acc {acc:.3f}",
              flush=True)

    full = decode_through(model, TensorAttnCache(config, "four_cache"), ids, labels)
    record("four_cache", "exact", full)
    for numerator in ("cluster_sum", "sampled"):
        for delta in args.model_deltas:
            for window in args.sizes["b_windows"]:
                cfg = dict(delta=delta, recent_window=window, sink_tokens=SINKS, numerator=numerator,
                           cluster_samples=4, value_samples=16)
                for layout in ("subgen4", "subgen2"):
                    if layout == "subgen2" and numerator == "sampled" and delta < max(args.model_deltas):
                        continue  # keeps the run short; the trend is the same
                    res = decode_through(model, TensorAttnCache(config, layout, cfg), ids, labels)
                    record(f"{layout}/{numerator}", f"delta={delta} window={window}", res)
    for tokens in args.sizes["b_tokens"]:
        for policy in ("window", "sinks+window", "random"):
            res = decode_through(model, eviction_cache(policy, tokens), ids, labels)
            record(policy, f"tokens={tokens}", res)


# ---------------------------------------------------------------------------------------------------------------
# (c) low dimension: keys uniform in the unit ball
# ---------------------------------------------------------------------------------------------------------------


def unit_ball(n, d, g):
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True) * torch.rand(n, 1, generator=g, dtype=torch.float64) ** (1 / d)


def part_c(args, rows_out):
    """Keys uniform in the unit ball of R^d (Lemma 5.4: (e^d, e/3)-clusterable). ‖q‖ grows as √d so that the
    spread of the scores <q, k1 ⊙ k2> (‖k1 ⊙ k2‖ ~ 1/√d) is the same in every d."""
    for d in args.sizes["c_dims"]:
        streams = []
        for n in args.sizes["c_ns"]:
            g = torch.Generator().manual_seed(d)
            k = torch.cat([unit_ball(n, d, g), unit_ball(n, d, g)], -1)
            v = 1 + 0.5 * torch.randn(n, 2 * d, generator=g, dtype=torch.float64)
            q = torch.randn(d, generator=g, dtype=torch.float64)
            q = args.lowdim_q_norm * math.sqrt(d / 2) * q / q.norm()
            k1, k2 = k.chunk(2, -1)
            v1, v2 = v.chunk(2, -1)
            streams.append((n, q, k, v, exact_decode(q, k1, k2, v1, v2)[0]))
        chosen = None
        for delta in LOWDIM_DELTAS:
            errs = []
            for n, q, k, v, o in streams:
                cfg = dict(delta=delta, recent_window=0, sink_tokens=0, numerator="cluster_sum")
                t0 = time.time()
                out, mem = run_subgen("subgen4", cfg, q, k, v, chunk=512)
                errs.append(float((out - o).norm() / o.norm()))
                rows_out.append(dict(d=d, delta=delta, n=n, memory_bytes=mem, rel_error=errs[-1],
                                     seconds=round(time.time() - t0, 2)))
            if max(errs) <= args.lowdim_target:
                chosen = delta
                break
        print(f"(c) d={d}: largest delta with error <= {args.lowdim_target} at every n: {chosen}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def plot(path: Path, rows_a, rows_b, rows_c, target: float):
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.6))
    d_plot = min(r["d"] for r in rows_a)
    ax = axes[0]
    for method in sorted({r["method"] for r in rows_a}):
        pts = [(r["n"], r["rel_error"]) for r in rows_a
               if r["stream"] == "phases" and r["d"] == d_plot and r["method"] == method]
        if pts:
            ax.loglog(*zip(*pts), marker="o", label=method)
    ax.set(title=f"(a) phases, d={d_plot}: relative error", xlabel="n", ylabel="‖Ô−O‖/‖O‖")
    ax.legend(fontsize=6)
    ax = axes[1]
    for method in sorted({r["method"] for r in rows_a if r["method"].startswith("subgen")}):
        pts = [(r["n"], r["memory_bytes"]) for r in rows_a
               if r["stream"] == "iid" and r["d"] == d_plot and r["method"] == method]
        if pts:
            ax.loglog(*zip(*pts), marker="o", label=method)
    ns = sorted({r["n"] for r in rows_a})
    ax.loglog(ns, [n * 4 * d_plot * ELEM for n in ns], "k--", label="four_cache")
    ax.set(title=f"(a) iid, d={d_plot}: memory", xlabel="n", ylabel="bytes per head")
    ax.legend(fontsize=6)
    ax = axes[2]
    for method in sorted({r["method"] for r in rows_b}):
        pts = sorted((r["memory_bytes_per_seq"], r["answer_accuracy"]) for r in rows_b if r["method"] == method)
        ax.semilogx(*zip(*pts), marker="o", linestyle="-" if len(pts) > 1 else "", label=method)
    ax.set(title="(b) recall model: answer accuracy", xlabel="cache bytes per sequence", ylabel="accuracy")
    ax.legend(fontsize=6)
    ax = axes[3]
    for d in sorted({r["d"] for r in rows_c}):
        for delta in sorted({r["delta"] for r in rows_c if r["d"] == d}):
            sel = [r for r in rows_c if r["d"] == d and r["delta"] == delta]
            if max(r["rel_error"] for r in sel) <= target:
                ax.loglog([r["n"] for r in sel], [r["memory_bytes"] for r in sel], marker="o", label=f"d={d}, δ={delta}")
    ax.set(title="(c) unit ball: memory at the target error", xlabel="n", ylabel="bytes per head")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def at_largest_n(rows_a: list[dict]) -> list[dict]:
    """Each (stream, d, method)'s row at its largest n."""
    out = []
    for kind in dict.fromkeys(r["stream"] for r in rows_a):
        for d in sorted({r["d"] for r in rows_a}):
            sel = [r for r in rows_a if r["stream"] == kind and r["d"] == d]
            for method in dict.fromkeys(r["method"] for r in sel):
                out.append(max((r for r in sel if r["method"] == method), key=lambda r: r["n"]))
    return out


def lowdim_choice(rows_c: list[dict], d: int, target: float) -> list[dict]:
    """(c)'s rows of the largest δ whose error is within `target` at every n (empty: none in the sweep)."""
    ok = [dl for dl in dict.fromkeys(r["delta"] for r in rows_c if r["d"] == d)
          if max(r["rel_error"] for r in rows_c if r["d"] == d and r["delta"] == dl) <= target]
    return [r for r in rows_c if r["d"] == d and r["delta"] == ok[0]] if ok else []


def tables(args, rows_a, rows_b, rows_c, seconds) -> list[tuple[str, list[str]]]:
    sizes = args.sizes
    settings = [
        ["all", f"caches hold float32; errors against float64 exact attention of the last token; "
                f"{args.threads} torch thread(s); this run took {seconds:.0f} s"],
        ["(a)", f"{SYN_CLUSTERS} clusters per stream, keys within δ/2 = {SYN_DELTA / 2} of one, values with mean 1, "
                f"‖q‖ = {SYN_Q_NORM}, scale 1; SubGen {SYN_SUBGEN}; d in {sizes['a_dims']}, n in {sizes['a_ns']} "
                f"(subgen2 up to n = {sizes['a_n2_max']}, its sampled numerator up to {sizes['a_n2_max'] // 4}; the "
                f"spread stream up to n = {sizes['a_n2_max']}, subgen4 cluster sums only); subgen4/budget: "
                f"budget_bytes = {BUDGET_FACTOR} x its exact window's bytes"],
        ["(b)", f"2 layers, hidden 64, 2 heads, no position embedding; {args.train_steps} training steps on sequences "
                f"of {args.seq_len} tokens; {args.eval_batch} held-out sequences; SubGen δ in {args.model_deltas}, "
                f"recent_window in {sizes['b_windows']}, sink_tokens {SINKS}, cluster_samples 4, value_samples 16; "
                f"baselines keep {sizes['b_tokens']} tokens"],
        ["(c)", f"keys uniform in the unit ball, ‖q‖ = {args.lowdim_q_norm}·√(d/2), subgen4 cluster sums without "
                f"a window; δ swept over {LOWDIM_DELTAS}; target error {args.lowdim_target}; d in {sizes['c_dims']}, "
                f"n in {sizes['c_ns']}"],
    ]
    out = [("Settings", markdown_table(["part", "settings"], settings))]
    if rows_a:
        err_rows = [[r["stream"], r["d"], r["method"], r["n"], f"{r['memory_bytes'] / 1024:.1f}", fmt(r["rel_error"]),
                     fmt(r["lemma51_ratio"])] for r in at_largest_n(rows_a)]
        out.append(("(a) Synthetic clusterable keys: error at each method's largest n", markdown_table(
            ["stream", "d", "method", "n", "memory (KB)", "‖Ô−O‖/‖O‖", "Lemma 5.1 ratio"], err_rows, "lrlrrrr")))
        ns = sorted({r["n"] for r in rows_a})
        d_mem = min(r["d"] for r in rows_a)
        mem_rows = []
        for kind in ("iid", "needle"):
            for method in ("subgen4/cluster_sum", "subgen4/sampled", "subgen2/cluster_sum", "subgen2/sampled"):
                cells = [next((str(r["memory_bytes"]) for r in rows_a if r["stream"] == kind and r["d"] == d_mem
                               and r["n"] == n and r["method"] == method), "–") for n in ns]
                mem_rows.append([kind, method, *cells])
        mem_rows.append(["–", "four_cache", *(str(n * 4 * d_mem * ELEM) for n in ns)])
        out.append((f"(a) Memory against n (bytes per head, d = {d_mem})",
                    markdown_table(["stream", "method", *(f"n={n}" for n in ns)], mem_rows, "ll" + "r" * len(ns))))
    if rows_b:
        exact = next(r["memory_bytes_per_seq"] for r in rows_b if r["method"] == "four_cache")
        model_rows = [[r["method"], r["setting"], f"{r['memory_bytes_per_seq'] / 1024:.1f}",
                       f"{r['memory_bytes_per_seq'] / exact:.0%}", f"{r['answer_loss']:.3f}", f"{r['answer_accuracy']:.3f}"]
                      for r in sorted(rows_b, key=lambda r: (r["method"], r["memory_bytes_per_seq"]))]
        out.append(("(b) Trained recall model decoded through each cache (memory: peak per sequence, all layers)",
                    markdown_table(["method", "setting", "memory per sequence (KB)", "of four_cache", "answer loss",
                                    "answer accuracy"], model_rows, "llrrrr")))
    if rows_c:
        ns = sorted({r["n"] for r in rows_c})
        low_rows = []
        for d in sorted({r["d"] for r in rows_c}):
            rs = lowdim_choice(rows_c, d, args.lowdim_target)
            if not rs:
                low_rows.append([d, "none in the sweep", *("–" for _ in ns), "–"])
                continue
            low_rows.append([d, rs[0]["delta"], *(r["memory_bytes"] for r in rs), fmt(max(r["rel_error"] for r in rs))])
        out.append((f"(c) Unit ball: the largest δ with error ≤ {args.lowdim_target} at every n, and its memory",
                    markdown_table(["d", "δ", *(f"memory n={n} (bytes)" for n in ns), "worst error"], low_rows,
                                   "rr" + "r" * (len(ns) + 1))))
    lines = findings(rows_a, rows_b, rows_c, args.lowdim_target)
    if lines:
        out.append(("What the numbers say (computed from the tables above)", lines))
    return out


def _span(values, spec=fmt) -> str:
    """'x' when all values format alike, else 'lowest to highest'."""
    low, high = spec(min(values)), spec(max(values))
    return low if low == high else f"{low} to {high}"


def findings(rows_a, rows_b, rows_c, target) -> list[str]:
    """The sentences with figures that docs/eval_subgen.md interprets, from the rows of the parts that ran."""
    lines = []
    if rows_a:
        top = at_largest_n(rows_a)
        d_mem = min(r["d"] for r in rows_a)

        def errors(method_test, streams):
            return [r["rel_error"] for r in top if method_test(r["method"]) and r["stream"] in streams]

        def memory(method, stream="iid"):
            return [r["memory_bytes"] for r in rows_a if r["method"] == method and r["d"] == d_mem
                    and r["stream"] == stream]

        cluster = lambda m: m == "subgen4/cluster_sum"
        exact_at = lambda numerator: (lambda m: m.endswith(f"@{numerator}"))
        sampled = lambda m: m.endswith("/sampled")
        lines += [
            f"- (a) subgen4/cluster_sum: relative error {_span(errors(cluster, ('iid', 'phases')))} on the iid and "
            f"phases streams and {_span(errors(cluster, ('needle',)))} on the needle, holding "
            f"{_span(memory('subgen4/cluster_sum'), str)} bytes per head at every n for d = {d_mem}; exact tokens of "
            f"the same bytes: {_span(errors(exact_at('cluster_sum'), ('iid', 'phases')))} (iid, phases) and "
            f"{_span(errors(exact_at('cluster_sum'), ('needle',)))} (needle).",
            f"- (a) the sampled numerator holds {_span(memory('subgen4/sampled'), str)} bytes per head where cluster "
            f"sums hold {_span(memory('subgen4/cluster_sum'), str)} (d = {d_mem}); its error is "
            f"{_span(errors(sampled, ('iid', 'phases', 'needle')))} over all streams and dimensions "
            f"({_span(errors(sampled, ('needle',)))} on the needle), against "
            f"{_span(errors(exact_at('sampled'), ('iid', 'phases')))} for exact tokens of its own size on iid and "
            "phases.",
        ]
        budget = lambda m: m == "subgen4/budget"
        if errors(budget, ("spread",)):
            spread = [r for r in top if r["stream"] == "spread" and r["d"] == d_mem]
            held = {r["method"]: r for r in spread}
            lines.append(
                f"- (a) the spread stream (keys that never cluster), d = {d_mem}, n = {spread[0]['n']}: fixed-δ "
                f"subgen4/cluster_sum holds {held['subgen4/cluster_sum']['memory_bytes']} bytes per head at error "
                f"{fmt(held['subgen4/cluster_sum']['rel_error'])}; subgen4/budget holds "
                f"{held['subgen4/budget']['memory_bytes']} at {fmt(held['subgen4/budget']['rel_error'])}, against "
                f"{fmt(held['sinks+window@budget']['rel_error'])} for sinks + window of its bytes. On the clusterable "
                f"streams the budget's error is {_span(errors(budget, ('iid', 'phases', 'needle')))}, exact tokens of "
                f"its bytes {_span(errors(exact_at('budget'), ('iid', 'phases', 'needle')))}.")
        window = [r for r in top if r["method"] == "window@cluster_sum" and r["stream"] == "needle" and r["d"] == d_mem]
        if window:
            lines.append(f"- (a) Lemma 5.1 ratio on the needle (d = {d_mem}): the window that misses the needle has "
                         f"relative error {fmt(window[0]['rel_error'])} and ratio {fmt(window[0]['lemma51_ratio'])}.")
        pair = {kind: memory("subgen2/cluster_sum", kind) for kind in ("iid", "needle")}
        if pair["iid"] and pair["needle"]:
            lines.append(f"- (a) subgen2/cluster_sum holds {_span(pair['iid'], str)} bytes per head on iid and "
                         f"{_span(pair['needle'], str)} on the needle (d = {d_mem}, n up to "
                         f"{max(r['n'] for r in rows_a if r['method'] == 'subgen2/cluster_sum')}), against "
                         f"{_span(memory('subgen4/cluster_sum'), str)} for subgen4.")
    if rows_b:
        exact = next(r["memory_bytes_per_seq"] for r in rows_b if r["method"] == "four_cache")
        share = {id(r): r["memory_bytes_per_seq"] / exact for r in rows_b}
        sub4 = [r for r in rows_b if r["method"] == "subgen4/cluster_sum"]
        best = max(r["answer_accuracy"] for r in sub4)
        small = min((r for r in sub4 if r["answer_accuracy"] == best), key=lambda r: r["memory_bytes_per_seq"])
        line = (f"- (b) subgen4/cluster_sum answers {best:.3f} at {small['memory_bytes_per_seq'] / 1024:.1f} KB per "
                f"sequence, {share[id(small)]:.0%} of four_cache")
        baselines = [r for r in rows_b if r["method"] in ("window", "sinks+window", "random")]
        for level in sorted({round(share[id(r)], 2) for r in baselines if share[id(r)] >= 0.5}):
            accs = [r["answer_accuracy"] for r in baselines if round(share[id(r)], 2) == level]
            line += f"; at {level:.0%} of four_cache the baselines answer {_span(accs, lambda x: f'{x:.3f}')}"
        lines.append(line + ".")
        sampled4 = [r["answer_accuracy"] for r in rows_b if r["method"] == "subgen4/sampled"]
        if sampled4:
            lines.append(f"- (b) subgen4/sampled answers {_span(sampled4, lambda x: f'{x:.3f}')} over its settings.")
        pair = [r for r in rows_b if r["method"] == "subgen2/cluster_sum"]
        if pair:
            delta = {id(r): float(r["setting"].split()[0].split("=")[1]) for r in pair}  # "delta=0.5 window=4"
            low = min(delta.values())
            low_shares = [share[id(r)] for r in pair if delta[id(r)] == low]
            under = sorted({delta[id(r)] for r in pair if share[id(r)] < 1})
            lines.append(f"- (b) subgen2/cluster_sum at δ = {low} holds {_span(low_shares, lambda x: f'{x:.0%}')} of "
                         f"four_cache's memory; below four_cache at δ in {under}.")
    if rows_c:
        for d in sorted({r["d"] for r in rows_c}):
            rs = lowdim_choice(rows_c, d, target)
            if rs:
                lines.append(f"- (c) d = {d}: {_span([r['memory_bytes'] for r in rs], str)} bytes from n = "
                             f"{rs[0]['n']} to {rs[-1]['n']} at δ = {rs[0]['delta']}.")
    return lines


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: docs/eval_subgen/ for a full run)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and a 10-step model, for a smoke run")
    p.add_argument("--parts", default="abc", help="which parts to run, any of a, b, c")
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny kernels: 1 is fastest on a busy box)")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--model-deltas", type=float, nargs="+", default=[0.5, 2.0, 8.0])
    p.add_argument("--lowdim-target", type=float, default=0.005)
    p.add_argument("--lowdim-q-norm", type=float, default=4.0)
    p.add_argument("--from-csv", action="store_true", help="run nothing: rebuild tables.md from --out's files")
    args = p.parse_args(argv)
    unknown = sorted(set(args.parts) - set("abc"))
    if unknown or not args.parts:
        p.error(f"--parts {args.parts!r}: allowed: one or more of the letters a, b, c")
    defaults = {key: p.get_default(key) for key in ("train_steps", "seq_len", "eval_batch", "model_deltas")}
    full = args.from_csv or (not args.quick and set(args.parts) == set("abc")
                             and all(getattr(args, k) == v for k, v in defaults.items()))
    if args.quick:
        for key, value in QUICK_B.items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    args.sizes = SIZES["quick" if args.quick else "full"]
    args.out = output_dir(p, args.out, NAME, full)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_csv:
        print(publish(args.out, render))
        return
    torch.set_num_threads(args.threads)
    load_before = load_snapshot()
    rows = {"a": [], "b": [], "c": []}
    t0 = time.time()
    parts = {"a": part_a, "b": part_b, "c": part_c}
    record = machine()
    for letter, run in parts.items():
        if letter in args.parts:
            run(args, rows[letter])
            write_csv(args.out / CSV_OF_PART[letter], rows[letter], record)
    seconds = time.time() - t0
    if set(args.parts) == set("abc"):
        plot(args.out / f"{NAME}.png", rows["a"], rows["b"], rows["c"], args.lowdim_target)
    settings = {key: getattr(args, key) for key in SETTINGS}
    write_run_record(args.out, run_record(MODULE, argv, TITLE, record, describe_load(load_before, load_snapshot()),
                                          settings=settings, seconds=round(seconds)))
    print(publish(args.out, render))
    print(f"total {seconds:.0f}s; wrote {args.out}")


def render(folder: Path) -> str:
    """tables.md from run.json and the CSVs of the parts that ran."""
    record = read_run_record(folder)
    args = SimpleNamespace(**record["settings"])
    rows = {letter: read_csv(Path(folder) / CSV_OF_PART[letter]) if letter in args.parts else []
            for letter in CSV_OF_PART}
    return render_document(record, tables(args, rows["a"], rows["b"], rows["c"], record["seconds"]))


if __name__ == "__main__":
    main()
