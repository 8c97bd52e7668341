"""Long context on real text: does a small byte-level model use its context, and which cache keeps what it uses?

    python -m scripts.bench.eval_long_context                        # full run: trains (once), writes docs/eval_long_context/
    python -m scripts.bench.eval_long_context --quick --out /tmp/lc  # tiny sizes, for a smoke run
    python -m scripts.bench.eval_long_context --from-csv docs/eval_long_context   # rebuild tables.md only

Text: the Python standard library's own top-level modules (`*.py` directly under `sysconfig`'s stdlib folder, on
any machine with Python). Modules whose name starts with a-m train the models; n-z are held out, and of those the
modules starting with n-r are the validation split (SubGen's radii are set there), s-z the test split (every
figure of the page). Each evaluated sequence is a window from the middle of one held-out module.

Two byte-level hybrids, [full, tensor, full], are trained here at the evaluation length and kept under
runs/bench/eval_long_context/<model>/ (outside git; a later run with the same settings reuses them):
"windowed" (tensor windows w1 = 64, w2 = 16, 512-byte blocks) and "unwindowed" (no tensor window, 256-byte
blocks, so SubGen's tensor-layer summaries run on text). Before any ranking the page shows that each model uses
its context: the loss with the exact cache against every layer keeping only the last W tokens, with paired standard
errors over sequences; where those differences are within noise the page says the model cannot rank caches.

Then, teacher-forced over the test split, at equal whole-cache memory (peak bytes per sequence over every layer):
exact; recent window; sinks + window; sliding window with re-computation (no cache: each step re-encodes the last
W tokens from position 0); accumulated-attention eviction (H2O-style); random eviction; SubGen with fixed radii and
with a byte budget (subgen4 with standard_layers="subgen"). Neither model has a polynomial layer, so the poly cache
is not in the comparison.
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

from hf_tensor_attn.cache import TensorAttnCache, TensorAttnCacheLayer, TensorAttnConstants
from hf_tensor_attn.ops.common import masked_softmax
from hf_tensor_attn.tokenization import BOS_ID, BYTE_OFFSET
from scripts.bench.harness import (
    RUNS, describe_load, load_snapshot, machine, markdown_table, output_dir, publish, pyplot, read_csv,
    read_run_record, render_document, run_record, write_csv, write_run_record,
)

NAME = "eval_long_context"
TITLE = "Long context on real text: does the model use it, and which cache keeps what it uses"
LAYER_TYPES = ["full_attention", "tensor_attention", "full_attention"]
# The two models; training settings are part of a model's identity (a stored model is reused only when they match).
MODELS = {
    "windowed": dict(w1=64, w2=16, seq_len=512, batch=12, steps=1200),
    "unwindowed": dict(w1=None, w2=None, seq_len=256, batch=8, steps=450),
}
COMMON = dict(hidden=128, heads=4, lr=3e-3, seed=0)
QUICK_MODEL = dict(hidden=16, heads=2, seq_len=48, batch=2, steps=4)
QUICK_WINDOWS = dict(w1=16, w2=4)  # the windowed model's windows in a --quick run (its text is 48 bytes)

# ---------------------------------------------------------------------------------------------------------------
# Data: the standard library's own modules
# ---------------------------------------------------------------------------------------------------------------


def stdlib_split() -> dict[str, list[Path]]:
    """Top-level stdlib modules by first letter: a-m train, n-r validation, s-z test."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.name[0].isalpha())
    first = lambda p: p.name[0].lower()  # noqa: E731
    return {"train": [p for p in files if first(p) <= "m"],
            "validation": [p for p in files if "n" <= first(p) <= "r"],
            "test": [p for p in files if first(p) >= "s"]}


def to_ids(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.long) + BYTE_OFFSET


def train_stream(files: list[Path]) -> torch.Tensor:
    """The modules as one id stream, each preceded by BOS."""
    return torch.cat([torch.cat([torch.tensor([BOS_ID]), to_ids(p.read_bytes())]) for p in files])


def eval_sequences(files: list[Path], count: int, length: int) -> tuple[torch.Tensor, list[str]]:
    """[count, length] ids: BOS, then the bytes from the first line start past the middle of each of the first `count`
    modules long enough; and those modules' names."""
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
        raise SystemExit(f"--eval-seqs {count}: only {len(seqs)} of these stdlib modules hold {length} bytes past "
                         "their middle; allowed: at most that many")
    return torch.stack(seqs), names


# ---------------------------------------------------------------------------------------------------------------
# The models, trained here once
# ---------------------------------------------------------------------------------------------------------------


def model_settings(name: str, quick: bool) -> dict:
    s = dict(COMMON, **MODELS[name])
    if quick:
        s.update(QUICK_MODEL, **(QUICK_WINDOWS if s["w1"] else {}))
    return s


def model_config(s: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "tensor_attn", hidden_size=s["hidden"], num_hidden_layers=len(LAYER_TYPES), num_attention_heads=s["heads"],
        intermediate_size=3 * s["hidden"], layer_types=LAYER_TYPES, w1=s["w1"], w2=s["w2"],
        max_position_embeddings=2048, vocab_size=259,
    )


def train_model(name: str, settings: dict, folder: Path):
    """Train the model (or load the one trained before with the same settings from `folder`)."""
    from transformers import AutoModelForCausalLM

    record_path = folder / "train_record.json"
    if record_path.exists() and json.loads(record_path.read_text())["settings"] == settings:
        print(f"{name}: loading the model trained before from {folder}", flush=True)
        return AutoModelForCausalLM.from_pretrained(folder).eval(), json.loads(record_path.read_text())
    s = settings
    stream = train_stream(stdlib_split()["train"])
    torch.manual_seed(s["seed"])
    model = AutoModelForCausalLM.from_config(model_config(s))
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, s["steps"] // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, i / s["steps"]))))
    rng = random.Random(s["seed"])
    t0, losses = time.time(), []
    for step in range(s["steps"]):
        starts = [rng.randrange(0, len(stream) - s["seq_len"]) for _ in range(s["batch"])]
        ids = torch.stack([stream[i : i + s["seq_len"]] for i in starts])
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == s["steps"] - 1:
            print(f"{name}: train step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    record = dict(settings=settings, train_bytes=int(len(stream)),
                  final_train_loss=round(sum(losses[-25:]) / len(losses[-25:]), 4),
                  train_seconds=round(time.time() - t0, 1))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    record_path.write_text(json.dumps(record, indent=1))
    return model.eval(), record



# ---------------------------------------------------------------------------------------------------------------
# Eviction baselines: one cache layer for both kinds of layer
# ---------------------------------------------------------------------------------------------------------------

POLICIES = ("window", "sinks+window", "score", "random")
SINKS = 4  # first positions "sinks+window" keeps (and SubGen's sink_tokens)
RANDOM_RECENT = 8  # "random" never evicts the newest tokens
# "score" keeps the newest half of its budget, as H2O splits its cache between recent tokens and heavy hitters: the
# newest tokens' attention has had no time to accumulate.
SCORE_RECENT_SHARE = 0.5


class EvictionLayer(TensorAttnCacheLayer):
    """Keep at most `budget` tokens of each sequence exactly and attend over them as if they were everything; one
    query per step (teacher-forced decoding). A standard layer (`stream_count` 1) or a tensor layer (2: k1 | k2,
    v1 | v2); a windowed tensor layer keeps at most max(w1, w2) tokens, drops a token first once neither window can
    see it, and masks its windows in absolute positions.

    Each sequence decides alone. policy "window" evicts the oldest, "sinks+window" the oldest past the first SINKS
    positions, "random" a uniformly random held token, "score" (H2O-style) the one with the least attention
    accumulated over the queries so far (summed over heads; for a tensor layer its pair weights marginalised on
    either key), sparing the newest SCORE_RECENT_SHARE of its budget; "random" spares the newest RANDOM_RECENT. Not a
    registered layout: built by hand.
    """

    def __init__(self, constants, *, policy: str, budget: int, stream_count: int, seed: int = 0):
        super().__init__(constants, policy=policy, budget=budget, stream_count=stream_count, seed=seed)
        self.policy, self.budget, self.stream_count = policy, budget, stream_count
        self.window = max(constants.w1, constants.w2) if stream_count == 2 and constants.w1 and constants.w2 else None
        if self.window:
            self.budget = min(budget, self.window)
        self.generator = torch.Generator().manual_seed(seed)

    def allocate(self, key_states, value_states):
        B = key_states.shape[0]
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self.pos = torch.zeros(B, 0, dtype=torch.long)  # absolute position of each held token, per sequence
        self.score = torch.zeros(B, 0, dtype=torch.float64)

    def append(self, key_states, value_states, attention_mask):
        B, _, T, _ = key_states.shape
        self.keys = torch.cat([self.keys, key_states], 2)
        self.values = torch.cat([self.values, value_states], 2)
        self.pos = torch.cat([self.pos, torch.arange(self.seen, self.seen + T).expand(B, T)], 1)
        self.score = torch.cat([self.score, torch.zeros(B, T, dtype=torch.float64)], 1)

    def read(self, query, attention_mask):
        if query.shape[2] != 1 or attention_mask is not None:
            raise ValueError("EvictionLayer serves teacher-forced decoding: one query per step, no padding")
        q, scale, (B, H, n, _) = query[:, :, 0], self.constants.scale, self.keys.shape
        if self.stream_count == 1:
            probs = torch.softmax(torch.einsum("bhd,bhnd->bhn", q, self.keys) * scale, -1)
            out = torch.einsum("bhn,bhnd->bhd", probs, self.values)
            mass = probs.sum(1)
        else:
            (k1, k2), (v1, v2) = self.keys.chunk(2, -1), self.values.chunk(2, -1)
            t = self.seen - 1  # the query's position
            ok1, ok2 = (self.pos > t - w if w else torch.ones(B, n, dtype=torch.bool)
                        for w in (self.constants.w1, self.constants.w2))
            scores = torch.einsum("bhd,bhad,bhcd->bhac", q, k1, k2).reshape(B, H, n * n) * scale
            allowed = (ok1[:, :, None] & ok2[:, None, :]).reshape(B, 1, n * n)
            probs = masked_softmax(scores, allowed).reshape(B, H, n, n)
            out = torch.einsum("bhac,bhad,bhcd->bhd", probs, v1, v2)
            mass = probs.sum((1, 3)) + probs.sum((1, 2))
        self.score += mass.double()
        while self.keys.shape[2] > self.budget:
            drop = self._drop()
            keep = torch.ones_like(self.pos, dtype=torch.bool).scatter_(1, drop[:, None], False)
            self._keep(torch.nonzero(keep)[:, 1].reshape(B, -1))
        return out[:, :, None]

    def _drop(self) -> torch.Tensor:
        """[B]: the index of the held token each sequence evicts next."""
        B, n = self.pos.shape
        spare = min(int(self.budget * SCORE_RECENT_SHARE) if self.policy == "score" else RANDOM_RECENT, n - 1)
        if self.policy == "window":
            drop = torch.zeros(B, dtype=torch.long)
        elif self.policy == "sinks+window":
            drop = (self.pos < SINKS).sum(1).clamp(max=n - 1)
        elif self.policy == "score":
            drop = self.score[:, : n - spare].argmin(1)
        else:
            drop = torch.randint(0, n - spare, (B,), generator=self.generator)
        if self.window:  # the oldest held token, once no window of the next query (position seen) reaches it
            drop = torch.where(self.pos[:, 0] <= self.seen - self.window, 0, drop)
        return drop

    def _keep(self, keep):
        """Keep the tokens `keep` [B, n'] (indices into what each sequence holds, ascending)."""
        index = keep[:, None, :, None].expand(*self.keys.shape[:2], keep.shape[1], self.keys.shape[3])
        self.keys, self.values = self.keys.gather(2, index), self.values.gather(2, index)
        self.pos, self.score = self.pos.gather(1, keep), self.score.gather(1, keep)

    def map_batch(self, fn):
        raise NotImplementedError("EvictionLayer serves one batch as it came")

    def move(self, device):
        self.keys, self.values = self.keys.to(device), self.values.to(device)

    def memory_bytes(self):
        """Keys and values held, plus the accumulated scores (float32 would do) where the policy needs them."""
        if not self.is_initialized:
            return 0
        held = (self.keys.numel() + self.values.numel()) * self.keys.element_size()
        return held + (self.score.numel() * 4 if self.policy == "score" else 0)


def baseline_cache(config, policy: str, tokens: int) -> TensorAttnCache:
    """Every layer keeps at most `tokens` tokens by `policy`."""
    cache = TensorAttnCache(config, "four_cache")
    tensor, standard = TensorAttnConstants.from_config(config), TensorAttnConstants(scale=config.head_dim**-0.5)
    cache.layers = [
        EvictionLayer(tensor, policy=policy, budget=tokens, stream_count=2) if t == "tensor_attention"
        else EvictionLayer(standard, policy=policy, budget=tokens, stream_count=1)
        for t in config.layer_types
    ]
    return cache


# ---------------------------------------------------------------------------------------------------------------
# Measuring: teacher-forced loss per sequence, and the whole cache's peak memory
# ---------------------------------------------------------------------------------------------------------------


def losses(logits, ids) -> torch.Tensor:
    """[B, L - 1] nats per predicted byte (position t predicts byte t + 1)."""
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


@torch.no_grad()
def decode_through(model, cache, ids):
    """Teacher-forced decoding from BOS one byte per step: [B, L - 1] losses and the peak of the whole cache's memory
    per sequence."""
    logits, peak = [], 0
    for t in range(ids.shape[1] - 1):
        logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        peak = max(peak, cache.memory_bytes())
    return losses(torch.cat(logits, 1), ids), peak // ids.shape[0]


@torch.no_grad()
def recompute_through(model, ids, window: int, chunk: int = 256):
    """Sliding window with re-computation: no cache; the byte after position t is predicted by encoding
    ids[t - window + 1 .. t] afresh (positions from 0). Losses as `decode_through`; memory: what a step's exact
    cache of `window` bytes needs (the window baseline's), built and dropped at every step."""
    B, L = ids.shape
    first = model(ids[:, :window]).logits  # positions < window see their whole prefix: exact
    windows = ids.unfold(1, window, 1)[:, 1 : L - window].reshape(-1, window)  # ends at positions window .. L - 2
    last = torch.cat([model(windows[i : i + chunk]).logits[:, -1] for i in range(0, len(windows), chunk)])
    logits = torch.cat([first, last.reshape(B, -1, last.shape[-1])], 1)
    # What a step holds: the `window` bytes in every layer, a windowed tensor layer only what its windows reach.
    _, memory = decode_through(model, baseline_cache(model.config, "window", window), ids[:, : window + 1])
    return losses(logits, ids), memory


@torch.no_grad()
def key_scale(model, ids) -> float:
    """Median l2 norm of the standard layers' keys over `ids` (validation text): the unit of SubGen's fixed radii."""
    cache = TensorAttnCache(model.config, "four_cache")
    model(ids, cache=cache, use_cache=True)
    keys = [layer.keys for layer, t in zip(cache.layers, model.config.layer_types) if t == "full_attention"]
    return float(torch.cat([k.reshape(-1, k.shape[-1]) for k in keys]).norm(dim=-1).median())


# ---------------------------------------------------------------------------------------------------------------
# One model's runs
# ---------------------------------------------------------------------------------------------------------------


def subgen_runs(config, settings, args, scale: float, batch: int) -> list[tuple[str, str, dict]]:
    """(method, setting, cache_config) of the SubGen runs: fixed radii (fractions of `scale`, the validation keys'
    median norm) and byte budgets (multiples of what the tensor layer's exact part alone needs)."""
    recent = max(settings["w1"] or 0, settings["w2"] or 0) or args.recent_window  # SubGen keeps a window exactly
    base = dict(standard_layers="subgen", recent_window=recent, sink_tokens=SINKS)
    runs = [("subgen δ", f"δ = {f} x key norm", dict(base, delta=round(f * scale, 4))) for f in args.delta_fractions]
    tensor_token = 2 * 2 * config.num_key_value_heads * config.head_dim * 4 * batch  # k1, k2, v1, v2 in float32
    fixed = (SINKS + recent) * tensor_token
    runs += [("subgen budget", f"budget = {f} x exact part", dict(base, delta=0.0, budget_bytes=int(f * fixed)))
             for f in args.budget_factors]
    return runs


def run_model(name: str, args, rows: list[dict], record: dict) -> None:
    settings = model_settings(name, args.quick)
    folder = (args.out / "models" if args.quick else RUNS / NAME) / name
    model, train_record = train_model(name, settings, folder)
    split = stdlib_split()
    L = min(args.eval_len, settings["seq_len"])
    ids, names = eval_sequences(split["test"], args.eval_seqs, L)
    valid, _ = eval_sequences(split["validation"], 4, L)
    scale = key_scale(model, valid)
    record[name] = dict(settings=settings, train=train_record, eval_len=L, test_files=names,
                        key_scale=round(scale, 4))

    def add(method, setting, tokens, fn):
        t0 = time.time()
        nll, mem = fn()
        half = nll.shape[1] // 2
        rows.append(dict(model=name, method=method, setting=setting, tokens=tokens, memory_bytes_per_seq=mem,
                         loss=round(float(nll.mean()), 5), loss_second_half=round(float(nll[:, half:].mean()), 5),
                         loss_per_seq=" ".join(f"{x:.5f}" for x in nll.mean(1).tolist()),
                         seconds=round(time.time() - t0, 1)))
        print(f"{name:10s} {method:14s} {setting:26s} mem/seq {mem:8d}  loss {rows[-1]['loss']:.4f} "
              f"({rows[-1]['seconds']:.0f}s)", flush=True)

    add("exact", "four_cache", "", lambda: decode_through(model, TensorAttnCache(model.config, "four_cache"), ids))
    for tokens in [t for t in args.tokens if t < L - 1]:  # a level holding every byte would be exact
        for policy in POLICIES:
            add(policy, f"{tokens} tokens", tokens, lambda: decode_through(model, baseline_cache(
                model.config, policy, tokens), ids))
        add("recompute", f"{tokens} tokens", tokens, lambda: recompute_through(model, ids, tokens))
    for method, setting, cfg in subgen_runs(model.config, settings, args, scale, ids.shape[0]):
        add(method, setting, "", lambda: decode_through(model, TensorAttnCache(model.config, "subgen4", cfg), ids))


# ---------------------------------------------------------------------------------------------------------------
# The page: built from text.csv and run.json alone
# ---------------------------------------------------------------------------------------------------------------

BASELINES = POLICIES + ("recompute",)
RANK_SE = 3  # a window "costs" the model its context when its loss exceeds exact's by more than this many s.e.
# A run sits at a memory level when it holds at most this much more than the level's window baseline: room for a
# policy's own bookkeeping (score's accumulated attention: one number per held token).
MEMORY_SLACK = 1.02


def per_seq(row) -> list[float]:
    return [float(x) for x in str(row["loss_per_seq"]).split()]


def paired(a: dict, b: dict) -> tuple[float, float]:
    """Mean over sequences of loss(a) - loss(b), and its standard error (0 with one sequence)."""
    x = [u - v for u, v in zip(per_seq(a), per_seq(b))]
    mean = sum(x) / len(x)
    if len(x) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((u - mean) ** 2 for u in x) / (len(x) - 1) / len(x))


def kb(x) -> str:
    return f"{float(x) / 1024:.1f}"


def uses_context(rows: list[dict]) -> tuple[list[str], bool]:
    """Exact against every layer keeping the last W tokens: the table, and whether the 32-token window (or the
    smallest above it) costs more than RANK_SE standard errors."""
    exact = next(r for r in rows if r["method"] == "exact")
    windows = sorted((r for r in rows if r["method"] == "window"), key=lambda r: int(r["tokens"]))
    table, verdict = [], None
    for r in windows:
        d, se = paired(r, exact)
        z = d / se if se else float("inf") if d > 0 else 0.0
        table.append([f"last {r['tokens']} tokens", f"{r['loss']:.4f}", f"{d:+.4f}", f"{se:.4f}", f"{z:.1f}"])
        if verdict is None and int(r["tokens"]) >= 32:
            verdict = (int(r["tokens"]), d, se, z)
    lines = markdown_table(["every layer keeps", "loss (nats/byte)", "minus exact", "± s.e.", "in s.e."],
                           [["everything (exact)", f"{exact['loss']:.4f}", "", "", ""]] + table, "lrrrr")
    tokens, d, se, z = verdict
    ok = z > RANK_SE
    lines += ["", (f"Keeping only the last {tokens} tokens costs {d:+.4f} nats/byte ({z:.1f} standard errors over "
                   "sequences): the model uses its context, so the caches below can be ranked by what they keep."
                   if ok else
                   f"Keeping only the last {tokens} tokens changes the loss by {d:+.4f} nats/byte, {z:.1f} standard "
                   f"errors (needed: more than {RANK_SE}): this model cannot rank caches; the comparison below is "
                   "shown, but no verdict is drawn from it.")]
    return lines, ok


def at_equal_memory(rows: list[dict]) -> tuple[list[str], list[str], list[str]]:
    """For each memory level (the window baseline's memory at each token count), each method's run that uses the
    most memory within MEMORY_SLACK of it (chosen by memory, never by loss), and the winner with its margin: the
    table, one sentence per level, and each level's winning method."""
    exact = next(r for r in rows if r["method"] == "exact")
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "exact"))
    levels = sorted((r for r in rows if r["method"] == "window"), key=lambda r: r["memory_bytes_per_seq"])
    table, sentences, winners = [], [], []
    for level in levels:
        cap = level["memory_bytes_per_seq"] * MEMORY_SLACK
        picks = {}
        for m in methods:
            fits = [r for r in rows if r["method"] == m and r["memory_bytes_per_seq"] <= cap]
            if fits:
                picks[m] = max(fits, key=lambda r: (r["memory_bytes_per_seq"], -r["loss"]))
        cells = [f"{picks[m]['loss']:.4f}" if m in picks else "–" for m in methods]
        table.append([f"{level['tokens']} tokens ({kb(level['memory_bytes_per_seq'])} KB)"] + cells)
        ranked = sorted(picks.values(), key=lambda r: r["loss"])
        best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
        winners.append(best["method"])
        text = (f"- {level['tokens']}-token memory ({kb(level['memory_bytes_per_seq'])} KB/seq): best {best['method']} ({best['setting']}) at "
                f"{best['loss']:.4f} nats/byte, {best['loss'] - exact['loss']:+.4f} from exact")
        if second is not None:
            d, se = paired(second, best)
            text += (f"; ahead of {second['method']} by {d:.4f} ± {se:.4f} "
                     f"({'more than' if d > 2 * se else 'within'} two standard errors)")
        for m in (m for m in picks if m.startswith("subgen") and picks[m] is not best):
            d, se = paired(picks[m], best)
            text += f"; {m} ({picks[m]['setting']}) behind it by {d:.4f} ± {se:.4f}"
        sentences.append(text + ".")
    head = ["memory level (whole cache, per sequence)"] + methods
    return markdown_table(head, table, "l" + "r" * len(methods)), sentences, winners


def render(folder) -> str:
    """tables.md of a run, from text.csv and run.json alone."""
    folder = Path(folder)
    run = read_run_record(folder)
    rows = read_csv(folder / "text.csv")
    sections = [("Settings", markdown_table(["what", "value"], [[k, v] for k, v in run["settings"].items()]))]
    for name in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == name]
        exact = next(r for r in sel if r["method"] == "exact")
        context, rankable = uses_context(sel)
        sections.append((f"{name}: does the model use its context?", context))
        table = []
        for r in sorted(sel, key=lambda r: (r["method"] != "exact", r["method"], r["memory_bytes_per_seq"])):
            d, se = paired(r, exact)
            table.append([r["method"], r["setting"], kb(r["memory_bytes_per_seq"]),
                          f"{r['memory_bytes_per_seq'] / exact['memory_bytes_per_seq']:.0%}", f"{r['loss']:.4f}",
                          "" if r is exact else f"{d:+.4f} ± {se:.4f}", f"{r['loss_second_half']:.4f}"])
        sections.append((f"{name}: every run (loss over held-out text; memory = the whole cache's peak)",
                         markdown_table(["method", "setting", "memory (KB/seq)", "of exact", "loss (nats/byte)",
                                         "minus exact ± s.e.", "loss, second half"], table, "llrrrrr")))
        equal, sentences, _ = at_equal_memory(sel)
        verdict = sentences if rankable else ["No verdict: the model does not use its context (above)."]
        sections.append((f"{name}: at equal memory", equal + [""] + verdict))
    return render_document(run, sections)


def plot(folder: Path) -> None:
    plt = pyplot()
    rows = read_csv(folder / "text.csv")
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.8), squeeze=False)
    for ax, name in zip(axes[0], models):
        sel = [r for r in rows if r["model"] == name]
        exact = next(r for r in sel if r["method"] == "exact")
        for method in dict.fromkeys(r["method"] for r in sel):
            pts = sorted((r["memory_bytes_per_seq"] / 1024, r["loss"], paired(r, exact)[1])
                         for r in sel if r["method"] == method)
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=2, linestyle="-" if len(pts) > 1 else "", label=method)
        ax.set_xscale("log")
        ax.set(title=f"{name}: held-out stdlib text", xlabel="whole cache, KB per sequence (peak)",
               ylabel="loss (nats/byte); bars: paired s.e. vs exact")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / f"{NAME}.png", dpi=110)
    plt.close(fig)


QUICK = dict(eval_seqs=2, eval_len=48, tokens=[8, 16, 32], delta_fractions=[0.5], budget_factors=[1.5])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: docs/eval_long_context/ for a full run)")
    p.add_argument("--quick", action="store_true", help="tiny 4-step models and sizes, for a smoke run")
    p.add_argument("--from-csv", default=None, metavar="FOLDER", help="only rebuild tables.md and the plot of FOLDER")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-seqs", type=int, default=32, help="held-out test sequences, decoded as one batch")
    p.add_argument("--eval-len", type=int, default=512, help="bytes per sequence (BOS included; at most the "
                   "model's training length)")
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 32, 64, 128, 256],
                   help="baselines' tokens per layer (those below the evaluated length)")
    p.add_argument("--recent-window", type=int, default=32, help="SubGen's exact window where the model sets none")
    p.add_argument("--delta-fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0],
                   help="SubGen's fixed radii, as fractions of the median key norm on validation text")
    p.add_argument("--budget-factors", type=float, nargs="+", default=[1.25, 1.5, 2.0, 3.0],
                   help="SubGen's budget_bytes per layer, as multiples of the tensor layer's exact part")
    args = p.parse_args(argv)
    if args.from_csv is not None:
        return args
    keys = list(QUICK)
    defaults = {key: p.get_default(key) for key in keys}
    full = not args.quick and args.models == list(MODELS) and all(getattr(args, k) == defaults[k] for k in keys)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    args.out = output_dir(p, args.out, NAME, full)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_csv is not None:
        plot(Path(args.from_csv))
        print(publish(Path(args.from_csv), render))
        return
    torch.set_num_threads(args.threads)
    load_before, record, t0 = load_snapshot(), machine(), time.time()
    rows, models = [], {}
    for name in args.models:
        run_model(name, args, rows, models)
        write_csv(args.out / "text.csv", rows, record)
    seconds = time.time() - t0
    settings = {
        "text": (f"Python {sys.version.split()[0]} standard library, top-level modules: a-m train, n-r validation "
                 f"(SubGen's key norm), s-z test; {args.eval_seqs} test sequences, each BOS then the bytes from the "
                 "first line past its module's middle"),
        "decoding": ("teacher-forced, one byte per step from BOS, the test sequences as one batch, float32; loss "
                     "over every predicted byte, paired standard errors over sequences; memory = peak of the whole "
                     "cache's memory_bytes() / sequences"),
        "baselines": (f"every layer keeps {args.tokens} tokens: window; sinks+window ({SINKS} sinks); score (H2O-style: "
                      f"least accumulated attention evicted, the newest {SCORE_RECENT_SHARE:.0%} of the budget spared); "
                      f"random ({RANDOM_RECENT} newest spared); recompute (no cache, each step re-encodes the last W "
                      "bytes)"),
        "SubGen": (f"subgen4 + standard_layers='subgen', cluster sums, {SINKS} sinks, recent_window = the tensor "
                   f"window or {args.recent_window}; δ = {args.delta_fractions} x the median key norm of the standard "
                   f"layers on validation text; budgets: delta 0, budget_bytes = {args.budget_factors} x the tensor "
                   "layer's exact part"),
        "run": f"{args.threads} torch thread(s), {seconds:.0f} s",
    }
    for name, m in models.items():
        s, train = m["settings"], m["train"]
        windows = f"w1 = {s['w1']}, w2 = {s['w2']}" if s["w1"] else "no window"
        settings[f"model {name}"] = (
            f"byte-level {LAYER_TYPES}, hidden {s['hidden']}, {s['heads']} heads, RoPE, tensor {windows}; trained "
            f"{s['steps']} steps x {s['batch']} x {s['seq_len']} bytes, AdamW lr {s['lr']}: final training loss "
            f"{train['final_train_loss']} nats/byte in {train['train_seconds']} s; evaluated on {m['eval_len']} bytes "
            f"of {', '.join(m['test_files'])}; key norm {m['key_scale']}")
    write_run_record(args.out, run_record(
        f"scripts.bench.{NAME}", argv, TITLE, record, describe_load(load_before, load_snapshot()),
        settings=settings, seconds=round(seconds, 1)))
    plot(args.out)
    print(publish(args.out, render))
    print(f"total {seconds:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--train-only"]:  # train the named models and stop (e.g. two at once on two cores)
        torch.set_num_threads(1)
        for name in sys.argv[2:]:
            train_model(name, model_settings(name, False), RUNS / NAME / name)
    else:
        main()
