"""SubGen on real text: loss per byte against the memory of the whole cache of a small hybrid model, for exact
attention, four eviction baselines and each SubGen variant; and the adaptive (byte-budget) SubGen beside the
fixed-δ one on the synthetic streams of eval_subgen.py plus an adversarial stream that never clusters.

    python -m scripts.bench.eval_subgen_text                        # full run: docs/eval_subgen_text/
    python -m scripts.bench.eval_subgen_text --quick --out /tmp/sgt # tiny sizes, for a smoke run
    python -m scripts.bench.eval_subgen_text --from-csv docs/eval_subgen_text   # rebuild tables.md only

Text: the Python standard library's own top-level modules (`*.py` directly under `sysconfig`'s stdlib folder, on
any machine with Python). Modules whose name starts with a-m train the model; modules n-z are held out and only
evaluated (a window from the middle of each of the first `--eval-seqs` held-out modules long enough).
Model: a byte-level (the package's tokenizer ids) 3-layer hybrid, standard | tensor | standard, trained here
at the evaluation length, so no position extrapolates. Its tensor layer has windows w1 = w2 (the training cost
of unwindowed tensor attention at 1k tokens is out of reach on a shared CPU), so every method keeps that layer's
window exactly and the methods differ in what the standard layers (and SubGen's bookkeeping) hold.

Writes text.csv, synthetic.csv, run.json, eval_subgen_text.png and tables.md (built from those files alone by
`render`) to --out (default docs/eval_subgen_text/ for a full run, runs/bench/eval_subgen_text/ for --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `scripts.bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from hf_tensor_attn.cache import TensorAttnCache, TensorAttnConstants
from hf_tensor_attn.ops import four_cache_decode
from hf_tensor_attn.tokenization import BOS_ID, BYTE_OFFSET
from scripts.bench import eval_subgen
from scripts.bench.eval_subgen import (  # the synthetic streams and the exact reference of eval_subgen.py
    SYN_CLUSTERS, SYN_DELTA, SYN_Q_NORM, SYN_SUBGEN, attend_over, baseline_kept, exact_decode, make_stream, run_subgen,
)
from scripts.bench.harness import (
    describe_load, load_snapshot, machine, markdown_table, output_dir, publish, pyplot, read_csv, read_run_record,
    render_document, run_record, write_csv, write_run_record,
)

NAME = "eval_subgen_text"
TITLE = "SubGen on real text, and the adaptive SubGen on synthetic streams"

# ---------------------------------------------------------------------------------------------------------------
# Data: the standard library's own modules
# ---------------------------------------------------------------------------------------------------------------


def stdlib_split() -> tuple[list[Path], list[Path]]:
    """(train, held-out) top-level stdlib modules: names a-m train, n-z are held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.name[0].isalpha())
    train = [p for p in files if p.name[0].lower() <= "m"]
    held = [p for p in files if p.name[0].lower() > "m"]
    return train, held


def to_ids(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.long) + BYTE_OFFSET


def train_stream(files: list[Path]) -> torch.Tensor:
    """All training modules as one id stream, each module preceded by BOS."""
    parts = []
    for p in files:
        parts += [torch.tensor([BOS_ID]), to_ids(p.read_bytes())]
    return torch.cat(parts)


def eval_sequences(files: list[Path], count: int, length: int) -> tuple[torch.Tensor, list[str]]:
    """[count, length] ids: BOS then the bytes from the first line start past the middle of each of the first
    `count` held-out modules long enough, and the modules' names."""
    seqs, names = [], []
    for p in files:
        data = p.read_bytes()
        start = data.find(b"\n", len(data) // 2) + 1
        if start <= 0 or len(data) - start < length - 1:
            continue
        seqs.append(torch.cat([torch.tensor([BOS_ID]), to_ids(data[start : start + length - 1])]))
        names.append(p.name)
        if len(seqs) == count:
            break
    if len(seqs) < count:
        raise SystemExit(f"only {len(seqs)} held-out stdlib modules hold {length} bytes past their middle; "
                         f"lower --eval-seqs or --eval-len")
    return torch.stack(seqs), names


# ---------------------------------------------------------------------------------------------------------------
# The model, trained here
# ---------------------------------------------------------------------------------------------------------------

LAYER_TYPES = ["full_attention", "tensor_attention", "full_attention"]


def model_config(args):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "tensor_attn", hidden_size=args.hidden, num_hidden_layers=len(LAYER_TYPES), num_attention_heads=2,
        intermediate_size=3 * args.hidden, layer_types=LAYER_TYPES, w1=args.tensor_window, w2=args.tensor_window,
        max_position_embeddings=max(2048, args.seq_len), vocab_size=259,
    )


def train_settings(args) -> dict:
    return dict(hidden=args.hidden, tensor_window=args.tensor_window, seq_len=args.seq_len, batch=args.batch,
                train_steps=args.train_steps, lr=args.lr, seed=0)


def train_model(args):
    """Train (or load the model this script trained before with the same settings, from --model-dir)."""
    from transformers import AutoModelForCausalLM

    settings = train_settings(args)
    folder = Path(args.model_dir)
    record = folder / "train_record.json"
    if record.exists() and json.loads(record.read_text())["settings"] == settings:
        print(f"loading the model trained before from {folder}", flush=True)
        return AutoModelForCausalLM.from_pretrained(folder).eval(), json.loads(record.read_text())
    train, _ = stdlib_split()
    stream = train_stream(train)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(args))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.train_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max(1, args.train_steps)))))
    rng = random.Random(0)
    t0, losses = time.time(), []
    for step in range(args.train_steps):
        starts = [rng.randrange(0, len(stream) - args.seq_len - 1) for _ in range(args.batch)]
        ids = torch.stack([stream[s : s + args.seq_len] for s in starts])
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % 10 == 0 or step == args.train_steps - 1:
            print(f"train step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    out = dict(settings=settings, train_files=len(train), train_bytes=int(len(stream)),
               final_train_loss=sum(losses[-10:]) / len(losses[-10:]), train_seconds=round(time.time() - t0, 1))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    record.write_text(json.dumps(out, indent=1))
    return model.eval(), out


# ---------------------------------------------------------------------------------------------------------------
# Eviction baselines, as cache layers for both kinds of layer
# ---------------------------------------------------------------------------------------------------------------


POLICIES = ("window", "sinks+window", "random", "score")
SINKS = eval_subgen.SINKS  # sinks of "sinks+window" (the base class uses it), and SubGen's sink_tokens
SCORE_RECENT = 8  # "score" never evicts the newest tokens (their attention has had no time to accumulate)


class EvictionLayer(eval_subgen.EvictionLayer):
    """eval_subgen's baseline (keep at most `budget` tokens exactly, attend over them as if they were everything)
    for a tensor layer (states k1 | k2, `stream_count` 2) or a standard layer (`stream_count` 1), plus the policy
    "score" (H2O / kvpress style): evict the token with the least attention accumulated over the queries so far
    (summed over heads and rows), sparing the SCORE_RECENT newest. One query per step (teacher-forced decoding).
    """

    def __init__(self, constants, *, policy: str, budget: int, stream_count: int, seed: int = 0):
        super().__init__(constants, policy=policy, budget=budget, seed=seed)
        self.stream_count = stream_count

    def allocate(self, key_states, value_states):
        super().allocate(key_states, value_states)
        self.score = torch.zeros(0)  # attention accumulated by each held token

    def append(self, key_states, value_states, attention_mask):
        super().append(key_states, value_states, attention_mask)
        self.score = torch.cat([self.score, torch.zeros(key_states.shape[2])])

    def read(self, query, attention_mask):
        if query.shape[2] != 1:
            raise ValueError("EvictionLayer serves teacher-forced decoding: one query per step")
        c = self.constants
        if self.stream_count == 1:
            probs = torch.softmax(torch.matmul(query, self.keys.transpose(-1, -2)) * c.scale, -1)  # [B, H, 1, n]
            out = torch.matmul(probs, self.values)
            mass = probs.sum((0, 1, 2))
        else:
            k1, k2 = self.keys.chunk(2, -1)
            v1, v2 = self.values.chunk(2, -1)
            out = four_cache_decode(query, k1, k2, v1, v2, scale=c.scale, w1=c.w1, w2=c.w2)
            mass = torch.zeros(self.keys.shape[2])  # "score" is only used on standard layers here
        self.score = self.score + mass
        self._evict()
        return out

    def _drop(self, n: int) -> int:
        if self.policy == "score":
            return int(self.score[: max(1, n - SCORE_RECENT)].argmin())
        return super()._drop(n)

    def _keep(self, keep: torch.Tensor) -> None:
        super()._keep(keep)
        self.score = self.score[keep]

    def memory_bytes(self):
        if not self.is_initialized:
            return 0
        return super().memory_bytes() + self.pos.numel() * 8 + self.score.numel() * self.score.element_size()


def baseline_cache(config, policy: str, tokens: int) -> TensorAttnCache:
    """Standard layers keep `tokens` tokens by `policy`; the (windowed) tensor layer keeps exactly its window."""
    cache = TensorAttnCache(config, "four_cache")
    standard = TensorAttnConstants(scale=config.head_dim**-0.5)
    tensor = TensorAttnConstants.from_config(config)
    cache.layers = [
        EvictionLayer(tensor, policy="window", budget=config.w1, stream_count=2) if t == "tensor_attention"
        else EvictionLayer(standard, policy=policy, budget=tokens, stream_count=1)
        for t in config.layer_types
    ]
    return cache


@torch.no_grad()
def decode_through(model, cache, ids):
    """Teacher-forced decoding one token at a time: loss per byte (all positions, and the second half), each
    sequence's loss, and the peak memory of the whole cache per sequence."""
    logits, peak = [], 0
    for t in range(ids.shape[1] - 1):
        logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        peak = max(peak, cache.memory_bytes())
    logits = torch.cat(logits, 1)  # position t predicts token t + 1
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, L - 1]
    half = nll.shape[1] // 2
    return float(nll.mean()), float(nll[:, half:].mean()), nll.mean(1).tolist(), peak // ids.shape[0]


@torch.no_grad()
def key_scale(model, length: int) -> float:
    """Median l2 norm of the standard layers' keys over the first `length` bytes of the *training* text: the unit of
    the fixed-δ radii, so that they are chosen without looking at held-out text."""
    train, _ = stdlib_split()
    ids = train_stream(train)[None, :length]
    cache = TensorAttnCache(model.config, "four_cache")
    model(ids, cache=cache, use_cache=True)
    keys = [layer.keys for layer, t in zip(cache.layers, model.config.layer_types) if t == "full_attention"]
    return float(torch.cat([k.reshape(-1, k.shape[-1]) for k in keys]).norm(dim=-1).median())


def subgen_settings(args, scale: float) -> list[tuple[str, str, dict]]:
    """(method, setting, cache_config) of every SubGen run on text; fixed radii are fractions of `scale`."""
    runs = []
    base = dict(standard_layers="subgen", recent_window=args.tensor_window, sink_tokens=SINKS)
    for fraction in args.delta_fractions:
        delta = round(fraction * scale, 3)
        runs.append(("subgen fixed δ", f"delta={delta} ({fraction} x key norm)", dict(base, delta=delta)))
    for tokens in args.budget_tokens:
        runs.append(("subgen budget", f"budget={tokens} tokens", dict(base, delta=0.0, budget_bytes=tokens * args.token_bytes)))
        runs.append(("subgen budget, sampled", f"budget={tokens} tokens",
                     dict(base, delta=0.0, budget_bytes=tokens * args.token_bytes, numerator="sampled",
                          cluster_samples=2, value_samples=16)))
    return runs


def part_text(args, rows_out, record):
    model, train_record = train_model(args)
    record["train"] = train_record
    _, held = stdlib_split()
    ids, names = eval_sequences(held, args.eval_seqs, args.eval_len)
    record["eval_files"] = names
    config = model.config
    # Bytes one standard layer holds per token and sequence (k and v, float32): the budgets' unit.
    args.token_bytes = 2 * config.num_attention_heads * config.head_dim * 4 * args.eval_seqs

    def run(method, setting, cache):
        t0 = time.time()
        loss, loss_2nd, per_seq, peak = decode_through(model, cache, ids)
        rows_out.append(dict(method=method, setting=setting, memory_bytes_per_seq=peak, loss=round(loss, 5),
                             loss_second_half=round(loss_2nd, 5), loss_per_seq=" ".join(f"{x:.5f}" for x in per_seq),
                             seconds=round(time.time() - t0, 1)))
        print(f"{method:24s} {setting:22s} mem/seq {peak:8d}  loss {loss:.4f}  2nd half {loss_2nd:.4f} "
              f"({time.time() - t0:.0f}s)", flush=True)

    run("exact", "four_cache", TensorAttnCache(config, "four_cache"))
    for tokens in args.tokens:
        for policy in POLICIES:
            run(policy, f"tokens={tokens}", baseline_cache(config, policy, tokens))
    scale = key_scale(model, args.eval_len)
    record["key_scale"] = round(scale, 3)
    for method, setting, cfg in subgen_settings(args, scale):
        run(method, setting, TensorAttnCache(config, "subgen4", cfg))


# ---------------------------------------------------------------------------------------------------------------
# Synthetic streams: the adaptive (budgeted) SubGen beside the fixed-δ one
# ---------------------------------------------------------------------------------------------------------------


SYN_D = 8
SYN_TOKEN_BYTES = 4 * SYN_D * 4  # a token of one head: k1, k2, v1, v2 in float32


def spread_stream(n: int, d: int, seed: int):
    """The adversarial stream: i.i.d. N(0, I) keys, pairwise ~√(2d) apart, so no δ below that clusters them."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, 2 * d, generator=g, dtype=torch.float64)
    v = 1 + 0.5 * torch.randn(n, 2 * d, generator=g, dtype=torch.float64)
    q = torch.randn(d, generator=g, dtype=torch.float64)
    return SYN_Q_NORM * q / q.norm(), k, v


def part_synthetic(args, rows_out):
    for kind in ("iid", "phases", "needle", "spread"):
        for n in args.syn_ns:
            if kind == "spread":
                q, k, v = spread_stream(n, SYN_D, seed=0)
            else:
                q, k, v = make_stream(kind, n, SYN_D, SYN_CLUSTERS, SYN_DELTA, seed=0, q_norm=SYN_Q_NORM)
            k1, k2 = k.chunk(2, -1)
            v1, v2 = v.chunk(2, -1)
            o, _ = exact_decode(q, k1, k2, v1, v2)

            def record(method, setting, out, mem, secs=0.0):
                rows_out.append(dict(stream=kind, n=n, method=method, setting=setting, memory_bytes=mem,
                                     rel_error=float((out - o).norm() / o.norm()), seconds=round(secs, 2)))

            cfg = dict(SYN_SUBGEN, numerator="cluster_sum", seed=0)
            t0 = time.time()
            out, mem = run_subgen("subgen4", cfg, q, k, v, chunk=256)
            record("subgen fixed δ", f"delta={SYN_DELTA}", out, mem, time.time() - t0)
            for budget in args.syn_budgets:
                t0 = time.time()
                out, mem = run_subgen("subgen4", dict(cfg, budget_bytes=budget), q, k, v, chunk=256)
                record("subgen budget", f"budget={budget}", out, mem, time.time() - t0)
                tokens = budget // SYN_TOKEN_BYTES
                kept = baseline_kept("sinks+window", n, tokens, seed=0)
                record("sinks+window", f"tokens={tokens}", attend_over(q, k1[kept], k2[kept], v1[kept], v2[kept]),
                       tokens * SYN_TOKEN_BYTES)
            print(f"synthetic {kind:6s} n={n:5d} done", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Output: run.json beside the CSVs, and render(folder) building tables.md from those files alone
# ---------------------------------------------------------------------------------------------------------------


BASELINES = ("window", "sinks+window", "random", "score")


def kb(x: float) -> str:
    return f"{x / 1024:.1f}"


def paired_se(a: dict, b: dict) -> float:
    """Standard error of the mean over sequences of the per-sequence loss difference a - b (0 with one sequence)."""
    x = [float(u) - float(v) for u, v in zip(str(a["loss_per_seq"]).split(), str(b["loss_per_seq"]).split())]
    if len(x) < 2:
        return 0.0
    mean = sum(x) / len(x)
    return math.sqrt(sum((u - mean) ** 2 for u in x) / (len(x) - 1) / len(x))


def text_verdict(rows: list[dict]) -> list[str]:
    """Each SubGen run against the best baseline holding no more memory per sequence; sentences from the data."""
    base = [r for r in rows if r["method"] in BASELINES]
    exact = next(r for r in rows if r["method"] == "exact")
    lines, wins, losses, total = [], 0, 0, 0
    table = []
    for r in (r for r in rows if r["method"].startswith("subgen")):
        rivals = [b for b in base if b["memory_bytes_per_seq"] <= r["memory_bytes_per_seq"]]
        if not rivals:
            table.append([r["method"], r["setting"], kb(r["memory_bytes_per_seq"]), f"{r['loss']:.4f}",
                          "none holds so little", "–", "–", "–"])
            continue
        best = min(rivals, key=lambda b: b["loss"])
        gain = best["loss"] - r["loss"]
        se = paired_se(best, r)
        total += 1
        wins += gain > 2 * se
        losses += gain < -2 * se
        table.append([r["method"], r["setting"], kb(r["memory_bytes_per_seq"]), f"{r['loss']:.4f}",
                      f"{best['method']} {best['setting']}", kb(best["memory_bytes_per_seq"]), f"{gain:+.4f}",
                      f"{se:.4f}"])
    lines += markdown_table(["SubGen", "setting", "memory (KB/seq)", "loss", "best baseline with no more memory",
                             "its memory (KB/seq)", "SubGen's gain (nats/byte)", "± s.e. over sequences"], table,
                            "llrrlrrr")
    gains = [float(t[-2]) for t in table if t[-1] != "–"]
    lines.append("")
    if total:
        lines.append(
            f"SubGen beats the best baseline holding no more memory by more than twice the standard error of the "
            f"paired difference in {wins} of {total} settings, loses by more than that in {losses}, and is within it "
            f"in {total - wins - losses} (gains from {min(gains):+.4f} to {max(gains):+.4f} nats/byte; positive: "
            "SubGen better)."
        )
    # Fidelity: how far from exact attention's loss each method lands (a lower loss than exact is also a departure).
    closer = 0
    measured = 0
    for r in (r for r in rows if r["method"].startswith("subgen")):
        rivals = [b for b in base if b["memory_bytes_per_seq"] <= r["memory_bytes_per_seq"]]
        if rivals:
            measured += 1
            nearest = min(abs(b["loss"] - exact["loss"]) for b in rivals)
            closer += abs(r["loss"] - exact["loss"]) < nearest
    if measured:
        lines += ["", f"Closer to exact attention's loss than every baseline holding no more memory: {closer} of "
                  f"{measured} SubGen settings."]
    best_any = min(base, key=lambda b: b["loss"])
    lines += ["", f"Exact attention: {exact['loss']:.4f} nats/byte at {kb(exact['memory_bytes_per_seq'])} KB per sequence; "
              f"the best baseline overall, {best_any['method']} {best_any['setting']}: {best_any['loss']:.4f} at "
              f"{kb(best_any['memory_bytes_per_seq'])} KB."]
    return lines


def synthetic_sections(rows: list[dict]) -> list[tuple[str, list[str]]]:
    n_max = max(r["n"] for r in rows)
    table = [[r["stream"], r["n"], r["method"], r["setting"], kb(r["memory_bytes"]), f"{r['rel_error']:.1e}"]
             for r in rows]
    sentences = []
    for kind in dict.fromkeys(r["stream"] for r in rows):
        sel = [r for r in rows if r["stream"] == kind and r["n"] == n_max]
        fixed = next(r for r in sel if r["method"] == "subgen fixed δ")
        budgeted = [r for r in sel if r["method"] == "subgen budget"]
        at_most = [r for r in budgeted if r["memory_bytes"] <= fixed["memory_bytes"]]
        text = (f"{kind}, n = {n_max}: fixed δ holds {kb(fixed['memory_bytes'])} KB at error "
                f"{fixed['rel_error']:.1e}; ")
        if at_most:
            b = max(at_most, key=lambda r: r["memory_bytes"])
            text += (f"the budgeted variant at {kb(b['memory_bytes'])} KB (no more) reaches {b['rel_error']:.1e} "
                     f"({b['rel_error'] / max(fixed['rel_error'], 1e-300):.2g}x the fixed-δ error)")
        else:
            b = min(budgeted, key=lambda r: r["memory_bytes"])
            text += (f"every budget is larger; the smallest, {kb(b['memory_bytes'])} KB, reaches {b['rel_error']:.1e}")
        windows = [r for r in sel if r["method"] == "sinks+window"]
        w = min(windows, key=lambda r: r["rel_error"])
        text += f"; the best sinks+window here: {w['rel_error']:.1e} at {kb(w['memory_bytes'])} KB."
        sentences.append(text)
    return [("Synthetic streams: the adaptive (budget) SubGen beside the fixed-δ one",
             markdown_table(["stream", "n", "method", "setting", "memory (KB, one head)", "‖Ô−O‖/‖O‖"], table,
                            "lrllrr") + [""] + [f"- {s}" for s in sentences])]


def render(folder) -> str:
    """tables.md of a run, from the files it wrote (text.csv, synthetic.csv, run.json) alone."""
    folder = Path(folder)
    run = read_run_record(folder)
    sections = [("Settings", markdown_table(["what", "value"], [[k, v] for k, v in run["settings"].items()]))]
    if (folder / "text.csv").exists():
        rows = read_csv(folder / "text.csv")
        exact = next(r["memory_bytes_per_seq"] for r in rows if r["method"] == "exact")
        table = [[r["method"], r["setting"], kb(r["memory_bytes_per_seq"]), f"{r['memory_bytes_per_seq'] / exact:.0%}",
                  f"{r['loss']:.4f}", f"{r['loss_second_half']:.4f}"]
                 for r in sorted(rows, key=lambda r: (r["method"], r["memory_bytes_per_seq"]))]
        sections.append(("Real text: loss per byte against the memory of the whole cache (peak, per sequence)",
                         markdown_table(["method", "setting", "memory (KB/seq)", "of exact", "loss (nats/byte)",
                                         "loss, second half"], table, "llrrrr")))
        sections.append(("Verdict on real text", text_verdict(rows)))
    if (folder / "synthetic.csv").exists():
        sections += synthetic_sections(read_csv(folder / "synthetic.csv"))
    return render_document(run, sections)


def plot(folder: Path) -> None:
    plt = pyplot()
    panels = [p for p in ("text.csv", "synthetic.csv") if (folder / p).exists()]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), squeeze=False)
    for ax, name in zip(axes[0], panels):
        rows = read_csv(folder / name)
        if name == "text.csv":
            for method in dict.fromkeys(r["method"] for r in rows):
                pts = sorted((r["memory_bytes_per_seq"] / 1024, r["loss"]) for r in rows if r["method"] == method)
                ax.semilogx(*zip(*pts), marker="o", linestyle="-" if len(pts) > 1 else "", label=method)
            ax.set(title="held-out stdlib text: loss vs whole-cache memory", xlabel="KB per sequence (peak)",
                   ylabel="loss (nats/byte)")
        else:
            n_max = max(r["n"] for r in rows)
            for kind in dict.fromkeys(r["stream"] for r in rows):
                for method, style in (("subgen fixed δ", "s"), ("subgen budget", "o"), ("sinks+window", "x")):
                    pts = sorted((r["memory_bytes"] / 1024, r["rel_error"]) for r in rows
                                 if r["stream"] == kind and r["n"] == n_max and r["method"] == method)
                    ax.loglog(*zip(*pts), marker=style, label=f"{kind}: {method}")
            ax.set(title=f"synthetic streams, n = {n_max}: error vs memory", xlabel="KB (one head)",
                   ylabel="‖Ô−O‖/‖O‖")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(folder / f"{NAME}.png", dpi=110)
    plt.close(fig)


SIZES = {
    "full": dict(syn_ns=[1024, 4096], syn_budgets=[6144, 8192, 16384]),
    "quick": dict(syn_ns=[256], syn_budgets=[8192]),
}
QUICK = dict(train_steps=4, seq_len=64, batch=2, eval_seqs=1, eval_len=48, hidden=16, tokens=[24], delta_fractions=[0.5],
             budget_tokens=[128])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: docs/eval_subgen_text/ for a full run)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and a 4-step model, for a smoke run")
    p.add_argument("--from-csv", default=None, metavar="FOLDER", help="only rebuild tables.md and the plot of FOLDER")
    p.add_argument("--parts", default="ts", help="t: real text, s: synthetic streams")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-dir", default=None, help="where the trained model is kept and reused "
                   "(default runs/bench/eval_subgen_text_model, or inside --out for --quick)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--tensor-window", type=int, default=32, help="w1 = w2 of the tensor layer")
    p.add_argument("--seq-len", type=int, default=1024, help="training length")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-seqs", type=int, default=3, help="held-out sequences, decoded as one batch")
    p.add_argument("--eval-len", type=int, default=1025, help="bytes per held-out sequence (BOS included)")
    p.add_argument("--tokens", type=int, nargs="+", default=[32, 64, 128, 256], help="baselines' tokens per standard layer")
    p.add_argument("--delta-fractions", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0],
                   help="fixed-δ SubGen radii, as fractions of the median key norm on training text")
    p.add_argument("--budget-tokens", type=int, nargs="+", default=[128, 192, 320, 576],
                   help="budgeted SubGen: budget_bytes per layer, in standard-layer tokens")
    args = p.parse_args(argv)
    if args.from_csv is not None:
        return args
    unknown = sorted(set(args.parts) - set("ts"))
    if unknown or not args.parts:
        p.error(f"--parts {args.parts!r}: allowed: one or more of the letters t, s")
    keys = list(QUICK)
    defaults = {key: p.get_default(key) for key in keys}
    full = not args.quick and set(args.parts) == set("ts") and all(getattr(args, k) == defaults[k] for k in keys)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    args.sizes = SIZES["quick" if args.quick else "full"]
    args.syn_ns, args.syn_budgets = args.sizes["syn_ns"], args.sizes["syn_budgets"]
    args.out = output_dir(p, args.out, NAME, full)
    if args.model_dir is None:
        root = Path(__file__).resolve().parents[2]
        args.model_dir = str(args.out / "model" if args.quick else root / "runs" / "bench" / f"{NAME}_model")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_csv is not None:
        plot(Path(args.from_csv))
        print(publish(Path(args.from_csv), render))
        return
    torch.set_num_threads(args.threads)
    load_before = load_snapshot()
    record = machine()
    t0 = time.time()
    run = {}  # what the parts report for the settings below
    text_rows, syn_rows = [], []
    if "t" in args.parts:
        part_text(args, text_rows, run)
        write_csv(args.out / "text.csv", text_rows, record)
    if "s" in args.parts:
        part_synthetic(args, syn_rows)
        write_csv(args.out / "synthetic.csv", syn_rows, record)
    seconds = time.time() - t0
    train = run.pop("train", None)
    files = run.pop("eval_files", [])
    scale = run.pop("key_scale", None)
    settings = {
        "text": (f"Python {sys.version.split()[0]} standard library, {sysconfig.get_paths()['stdlib']}/*.py: "
                 f"modules a-m train the model, n-z are held out; evaluated: {', '.join(files)} "
                 f"({args.eval_len - 1} bytes from the first line past each one's middle, after BOS)"),
        "model": (f"byte-level, layers {LAYER_TYPES}, hidden {args.hidden}, 2 heads, RoPE, tensor windows "
                  f"w1 = w2 = {args.tensor_window}; trained {args.train_steps} steps x {args.batch} x {args.seq_len} "
                  f"bytes, AdamW lr {args.lr}"
                  + (f"; final training loss {train['final_train_loss']:.3f} nats/byte, {train['train_seconds']} s"
                     if train else "")),
        "decoding": (f"teacher-forced, one byte per step from BOS, {args.eval_seqs} sequences as one batch; loss "
                     "over every predicted byte; memory = peak of the whole cache's memory_bytes() / sequences"),
        "baselines": (f"standard layers keep {args.tokens} tokens (window, sinks+window with {SINKS} sinks, random, "
                      f"score = least accumulated attention evicted, {SCORE_RECENT} newest spared); the tensor layer "
                      "keeps exactly its window"),
        "SubGen": (f"subgen4 + standard_layers='subgen', cluster sums unless 'sampled', recent_window "
                   f"{args.tensor_window}, sink_tokens {SINKS}; fixed δ = {args.delta_fractions} x the median key norm of the "
                   f"standard layers on training text ({scale}); budgeted: delta 0, "
                   f"budget_bytes per layer = {args.budget_tokens} standard-layer tokens"),
        "synthetic": (f"eval_subgen.py's streams (d = {SYN_D}, {SYN_CLUSTERS} clusters, δ = {SYN_DELTA}) plus "
                      f"'spread' (i.i.d. N(0, I) keys: never clusters), n in {args.syn_ns}; subgen4 cluster sums "
                      f"{SYN_SUBGEN}; budgets {args.syn_budgets} bytes; sinks+window at each budget's tokens"),
        "run": f"{args.threads} torch thread(s), {seconds:.0f} s",
    }
    if "t" not in args.parts:
        settings = {k: v for k, v in settings.items() if k in ("synthetic", "run")}
    if "s" not in args.parts:
        del settings["synthetic"]
    write_run_record(args.out, run_record(
        f"scripts.bench.{NAME}", argv, TITLE, record, describe_load(load_before, load_snapshot()),
        settings=settings, seconds=round(seconds, 1)))
    plot(args.out)
    print(publish(args.out, render))
    print(f"total {seconds:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
