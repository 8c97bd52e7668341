#!/usr/bin/env python
"""Alman & Song's polynomial method, measured: `ops.poly_tensor_attention`, the `poly` cache and the trainable
`"poly_tensor_attention"` layer.

    python -m scripts.bench.bench_poly                      # full run: docs/bench_poly/
    python -m scripts.bench.bench_poly --quick --out /tmp/p # smoke run at tiny sizes

Five parts, each a CSV (and the figure bench_poly.png, tables.md):

- error.csv      relative error of the polynomial op against the exact tiled `tensor_attention` (float64), entries of
                 q, k1, k2, v1, v2 uniform in [-B, B], scale 1/d, d = 8, for n in {256, 1024, 4096} and degrees 2..8:
                 Taylor P, and (n <= 1024) the Chebyshev fit of exp on [-B^3, B^3], the interval the seed's P covers.
                 The error is taken over the last `--queries` positions (each sees all but a few of the n^2 pairs):
                 an explicit n^3 reference is impossible at n = 4096, the exact tiled op on a few queries is not.
- runtime.csv    causal prefill (every query) of the poly op (degrees 2, 4, 6), of the exact op (up to `--max-exact-n`,
                 it is O(n^3 d)) and of the exact op with windows w1 = w2 = 256, float32, d = 8, against n up to
                 4096. The crossovers are read from the measurements (from which n on poly is ahead at every
                 measured n); log-log slopes are shown beside them.
- match3.csv     Match3 with the existing protocol (hf_tensor_attn.data, the training run of scripts/train.py, the
                 held-out test set of match3_experiment) at a small scale: one exact tensor layer and one poly layer of
                 the same width, same steps; then the exact-trained model decoded through the `poly` cache for each
                 degree, with the magnitude of its trained scores.
- throughput.csv training (forward + backward) tokens per second of one layer, poly vs exact, against T up to 4096
                 (exact up to `--max-exact-train`).
- memory.csv     cache bytes per layer after T tokens: the poly state vs `four_cache`, for the throughput model.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `scripts.bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_tensor_attn import TensorAttnCache
from hf_tensor_attn.arguments import parse_args as parse_run_args
from hf_tensor_attn.ops import poly_tensor_attention, tensor_attention
from hf_tensor_attn.ops.poly.common import num_features
from hf_tensor_attn.training import train
from scripts.bench.harness import (
    ROOT, ahead_from, describe_load, load_snapshot, machine, markdown_table, measure, output_dir, publish, pyplot, read_csv,
    read_run_record, render_document, run_record, write_csv, write_run_record,
)
from hf_tensor_attn.data import Match3Task
from scripts.bench.match3_experiment import TEST_SEED, test_accuracy

NAME = "bench_poly"
D = 8
MATCH3_CONFIG = ROOT / "configs" / "match3-tensor.json"

FULL = dict(error_n=[256, 1024, 4096], degrees=list(range(2, 9)), bounds=[0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0],
            cheb_max_n=1024, runtime_n=[256, 512, 1024, 2048, 4096], runtime_degrees=[2, 4, 6], exact_window=256,
            train_T=[256, 1024, 4096],
            memory_T=[256, 1024, 4096, 16384], match3_steps=200, decode_degrees=[2, 4, 6, 8], decode_examples=200)
QUICK = dict(error_n=[16, 32], degrees=[2, 3], bounds=[0.5, 2.0], cheb_max_n=32, runtime_n=[16, 32, 64],
             runtime_degrees=[2], exact_window=16, train_T=[16, 32], memory_T=[16, 64], match3_steps=2, decode_degrees=[2],
             decode_examples=16)


def uniform(shape, B: float, generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * B


def error_rows(sizes: dict, queries: int) -> list[dict]:
    rows = []
    for n in sizes["error_n"]:
        for B in sizes["bounds"]:
            g = torch.Generator().manual_seed(n)
            q = uniform((1, 1, queries, D), B, g)
            k1, k2, v1, v2 = (uniform((1, 1, n, D), B, g) for _ in range(4))
            exact = tensor_attention(q, k1, k2, v1, v2, scale=1 / D)  # the last `queries` positions
            scores = torch.einsum("bhtd,bhad,bhcd->bhtac", q[:, :, -1:], k1, k2) / D if n <= 1024 else None
            for degree in sizes["degrees"]:
                polys = [("taylor", None)] + ([("chebyshev", B**3)] if n <= sizes["cheb_max_n"] else [])
                for kind, bound in polys:
                    started = time.perf_counter()
                    approx = poly_tensor_attention(q, k1, k2, v1, v2, scale=1 / D, degree=degree, score_bound=bound)
                    rows.append({
                        "n": n, "B": B, "degree": degree, "polynomial": kind,
                        "relative_error": ((approx - exact).norm() / exact.norm()).item(),
                        "max_abs_score": "" if scores is None else scores.abs().max().item(),
                        "seconds": round(time.perf_counter() - started, 3),
                    })
            print(f"error: n={n} B={B} done", flush=True)
    return rows


def fit(ns, seconds) -> tuple[float, float]:
    """(exponent k, log a) of seconds = a n^k, least squares in log-log."""
    k, log_a = np.polyfit(np.log(ns), np.log(seconds), 1)
    return float(k), float(log_a)


def runtime_rows(sizes: dict, max_exact_n: int, wait_idle: float) -> list[dict]:
    rows = []
    for n in sizes["runtime_n"]:
        g = torch.Generator().manual_seed(0)
        q, k1, k2, v1, v2 = (torch.randn(1, 1, n, D, generator=g) for _ in range(5))
        methods = [(f"poly degree {g_}", lambda g_=g_: poly_tensor_attention(q, k1, k2, v1, v2, scale=1 / D, degree=g_))
                   for g_ in sizes["runtime_degrees"]]
        if n <= max_exact_n:
            methods.append(("exact", lambda: tensor_attention(q, k1, k2, v1, v2, scale=1 / D)))
        w = sizes["exact_window"]
        methods.append((f"exact, w1 = w2 = {w}", lambda: tensor_attention(q, k1, k2, v1, v2, scale=1 / D, w1=w, w2=w)))
        for method, fn in methods:
            t = measure(fn, repeats=1, min_run_time=0.05, wait_idle=wait_idle)
            rows.append({"n": n, "method": method, "seconds": t.best, "disturbed": t.disturbed})
        print(f"runtime: n={n} done", flush=True)
    return rows


def match3_args(layer_type: str, steps: int, work: Path, quick: bool) -> list[str]:
    """The existing Match3 run config (configs/match3-tensor.json) at a smaller width (head_dim 8, so the poly
    cache of the exact model stays small at high degree) and `steps` steps."""
    args = [str(MATCH3_CONFIG), "--layer_types", layer_type, "--hidden_size=32", "--num_attention_heads=4",
            f"--max_steps={steps}", f"--output_dir={work / layer_type}", "--save_strategy=no", "--disable_tqdm=true",
            "--eval_strategy=no", "--logging_steps=10", "--num_train_examples=8000", "--num_eval_examples=200"]
    if quick:
        args += ["--length=8", "--num_train_examples=64", "--per_device_train_batch_size=8", "--logging_steps=1"]
    return args


def trained_scores(model, ids) -> torch.Tensor:
    """|scale * <q, k1 * k2>| of every causal pair of the (first) tensor layer on `ids` (NoPE: no rotation)."""
    attention = model.model.layers[0].self_attn
    captured = {}
    hooks = [getattr(attention, name).register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o))
             for name in ("q_proj", "k_proj")]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    B, T = ids.shape
    H, Dh = attention.num_heads, attention.head_dim
    q = captured["q_proj"].view(B, T, H, Dh).transpose(1, 2)
    k1, k2 = captured["k_proj"].view(B, T, H, 2 * Dh).transpose(1, 2).chunk(2, -1)
    s = torch.einsum("bhtd,bhad,bhcd->bhtac", q, k1, k2) * attention.constants.scale
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal[:, :, None] & causal[:, None, :]
    return s.abs()[allowed.expand_as(s)]


def test_set(data_args, num_examples: int) -> Match3Task:
    """The Match3 test sequences of match3_experiment's protocol (its test seed) for these data arguments."""
    return Match3Task(data_args.modulus, data_args.length, num_examples, TEST_SEED, data_args.positive_rate)


def match3_rows(sizes: dict, work: Path, quick: bool) -> tuple[list[dict], dict]:
    rows, models = [], {}
    for layer_type in ("tensor_attention", "poly_tensor_attention"):
        shutil.rmtree(work / layer_type, ignore_errors=True)
        model_args, data_args, training_args = parse_run_args(match3_args(layer_type, sizes["match3_steps"], work, quick))
        started = time.perf_counter()
        trainer = train(model_args, data_args, training_args)
        seconds = time.perf_counter() - started
        model = trainer.model.eval()
        models[layer_type] = model
        rows.append({"part": "trained", "layer": layer_type, "steps": trainer.state.global_step, "decode_cache": "none",
                     "degree": model.config.poly_degree if layer_type.startswith("poly") else "",
                     "test_accuracy": round(test_accuracy(model, test_set(data_args, sizes["decode_examples"] * 5).build()), 4),
                     "train_seconds": round(seconds, 1)})
        print(rows[-1], flush=True)

    # The exact-trained model through the poly cache: one prefill of each test sequence (= decoding it token by
    # token: tests/cache/test_poly_cache.py), answers read from the logits as in the protocol.
    exact = models["tensor_attention"]
    data = test_set(data_args, sizes["decode_examples"]).build()
    ids, labels = torch.tensor(data["input_ids"]), torch.tensor(data["labels"])
    scores = trained_scores(exact, ids[:20])
    stats = {"max": scores.max().item(), "p99": scores.quantile(0.99).item(), "median": scores.median().item(),
             "M": data_args.modulus, "N": data_args.length}
    from hf_tensor_attn.data import answer_accuracy

    for degree in sizes["decode_degrees"]:
        with torch.no_grad():  # a fresh cache per batch of sequences: the state is O(batch r d)
            logits = torch.cat([exact(ids[i : i + 25], cache=TensorAttnCache(exact.config, "poly", {"degree": degree})).logits
                                for i in range(0, len(ids), 25)])
        rows.append({"part": "exact model, poly cache", "layer": "tensor_attention", "steps": "",
                     "decode_cache": "poly", "degree": degree,
                     "test_accuracy": round(answer_accuracy(logits, labels), 4), "train_seconds": ""})
        print(rows[-1], flush=True)
    with torch.no_grad():
        logits = exact(ids, use_cache=False).logits
    rows.append({"part": "exact model, poly cache", "layer": "tensor_attention", "steps": "", "decode_cache": "none",
                 "degree": "", "test_accuracy": round(answer_accuracy(logits, labels), 4), "train_seconds": ""})
    return rows, stats


def layer_model(layer_type: str):
    config = AutoConfig.for_model("tensor_attn", hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  layer_types=[layer_type], poly_feature_dim=8, vocab_size=259,
                                  max_position_embeddings=1 << 15, position_embedding_type="none")
    return AutoModelForCausalLM.from_config(config)


def throughput_rows(sizes: dict, max_exact_train: int, wait_idle: float) -> list[dict]:
    rows = []
    for layer_type in ("poly_tensor_attention", "tensor_attention"):
        model = layer_model(layer_type).train()
        for T in sizes["train_T"]:
            if layer_type == "tensor_attention" and T > max_exact_train:
                continue
            ids = torch.randint(3, 259, (1, T))

            def step():
                model(ids, labels=ids).loss.backward()

            t = measure(step, repeats=1, min_run_time=0.05, wait_idle=wait_idle)
            rows.append({"layer": layer_type, "T": T, "seconds_per_step": t.best, "tokens_per_second": T / t.best,
                         "disturbed": t.disturbed})
            print(rows[-1], flush=True)
    return rows


def memory_rows(sizes: dict) -> list[dict]:
    """Bytes held by the cache layer of the throughput model after T tokens (random states: memory does not depend
    on values)."""
    rows = []
    for layer_type, layout in (("poly_tensor_attention", "four_cache"), ("tensor_attention", "four_cache")):
        config = layer_model(layer_type).config
        H, Dh, f = config.num_attention_heads, config.head_dim, config.poly_feature_dim
        width = f if layer_type.startswith("poly") else Dh
        for T in sizes["memory_T"]:
            layer = TensorAttnCache(config, layout).layers[0]
            g = torch.Generator().manual_seed(0)
            for lo in range(0, T, 4096):  # prefill in pieces, as long prompts are
                n = min(4096, T - lo)
                k = torch.randn(1, H, n, 2 * width, generator=g)
                v = torch.randn(1, H, n, 2 * Dh, generator=g)
                layer.update(k, v)
                if layer_type.startswith("poly"):
                    layer.attend(torch.randn(1, H, 1, width, generator=g))
            rows.append({"layer": layer_type, "cache": type(layer).__name__, "T": T, "bytes": layer.memory_bytes(),
                         "bytes_per_token": layer.memory_bytes() / T})
    return rows


def plot(err, runtime, throughput, path: Path) -> None:
    plt = pyplot()
    ns = sorted({r["n"] for r in err})
    fig, axes = plt.subplots(1, len(ns) + 2, figsize=(5 * (len(ns) + 2), 4))
    for ax, n in zip(axes, ns):
        for degree in sorted({r["degree"] for r in err}):
            pts = [r for r in err if r["n"] == n and r["degree"] == degree and r["polynomial"] == "taylor"]
            ax.plot([r["B"] for r in pts], [max(r["relative_error"], 1e-17) for r in pts], marker=".",
                    label=f"g={degree}")
        ax.axvline(math.log(n) ** (1 / 3), color="k", linestyle="--", linewidth=1, label="(ln n)^(1/3)")
        ax.set(xlabel="B (entries uniform in [-B, B])", ylabel="relative error vs exact", yscale="log",
               title=f"Taylor P, n={n}, d={D}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[len(ns)]
    for method in dict.fromkeys(r["method"] for r in runtime):
        pts = [r for r in runtime if r["method"] == method]
        ax.plot([r["n"] for r in pts], [r["seconds"] for r in pts], marker="o", label=method)
    ax.set(xlabel="n", ylabel="seconds (causal prefill, float32)", xscale="log", yscale="log",
           title=f"runtime, d={D}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[len(ns) + 1]
    for layer in dict.fromkeys(r["layer"] for r in throughput):
        pts = [r for r in throughput if r["layer"] == layer]
        ax.plot([r["T"] for r in pts], [r["tokens_per_second"] for r in pts], marker="o", label=layer)
    ax.set(xlabel="T", ylabel="training tokens / s (fwd + bwd)", xscale="log", yscale="log",
           title="one layer, hidden 64, 2 heads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def error_tables(err: list[dict]) -> list[tuple[str, list[str]]]:
    sections = []
    for kind in dict.fromkeys(r["polynomial"] for r in err):
        ns = sorted({r["n"] for r in err if r["polynomial"] == kind})
        for n in ns:
            pts = [r for r in err if r["n"] == n and r["polynomial"] == kind]
            bounds = sorted({r["B"] for r in pts})
            degrees = sorted({r["degree"] for r in pts})
            body = [[f"g={g}"] + [f"{next(r['relative_error'] for r in pts if r['B'] == B and r['degree'] == g):.1e}"
                                  for B in bounds] for g in degrees]
            scores = [next((r["max_abs_score"] for r in pts if r["B"] == B), "") for B in bounds]
            if all(s != "" for s in scores):
                body.append(["max abs score (last query)"] + [f"{s:.2f}" for s in scores])
            sections.append((f"Relative error, {kind} P, n={n} ((ln n)^(1/3) = {math.log(n) ** (1 / 3):.2f})",
                             markdown_table(["", *(f"B={B}" for B in bounds)], body, "l" + "r" * len(bounds))))
    return sections


def measured_crossover(rows: list[dict], key: str, value: str, fast: str, slow: str) -> str:
    """Where `fast`'s `value` (seconds, bytes) is at most `slow`'s at every measured `key` (n, T) from there on."""
    pairs = sorted((int(r[key]), float(r[value]), float(o[value])) for r in rows if r["method"] == fast
                   for o in rows if o["method"] == slow and int(o[key]) == int(r[key]))
    if not pairs:
        return f"- {fast} vs {slow}: no {key} measured for both"
    ahead = [n for n, a, b in pairs if a <= b]
    since = ahead_from((n, a <= b) for n, a, b in pairs)
    span = f"{key} = {pairs[0][0]}..{pairs[-1][0]}"
    if since is None:
        return f"- {fast} vs {slow}: behind at every measured {key} ({span})"
    if since == pairs[0][0]:
        return f"- {fast} vs {slow}: ahead at every measured {key} ({span})"
    behind = max(n for n, a, b in pairs if a > b)
    return (f"- {fast} vs {slow}: ahead from {key} = {since} on, behind at {key} = {behind} (measured {span}; ahead at "
            f"{len(ahead)} of {len(pairs)})")


def runtime_tables(runtime: list[dict], memory: list[dict]) -> list[tuple[str, list[str]]]:
    methods = list(dict.fromkeys(r["method"] for r in runtime))
    ns = sorted({r["n"] for r in runtime})
    body = [[n] + [next((f"{r['seconds']:.4f} ({1e6 * r['seconds'] / n:.1f})" + ("*" if disturbed(r) else "")
                         for r in runtime if r["n"] == n and r["method"] == m), "not run") for m in methods] for n in ns]
    fits = {}
    for m in methods:
        pts = [r for r in runtime if r["method"] == m]
        if len(pts) >= 2:
            fits[m] = fit([r["n"] for r in pts], [r["seconds"] for r in pts])
    lines = [f"- {m}: seconds ∝ n^{k:.2f}" for m, (k, _) in fits.items()]
    crossings = [measured_crossover(runtime, "n", "seconds", m, exact) for exact in methods if exact.startswith("exact")
                 for m in methods if m.startswith("poly")]
    names = {"poly_tensor_attention": "poly layer's state", "tensor_attention": "tensor layer's four_cache"}
    by_cache = [dict(r, method=names[r["layer"]]) for r in memory]
    crossings.append(measured_crossover(by_cache, "T", "bytes", *names.values()))
    return [("Causal prefill, seconds per call (µs per token) (float32, d=8, one head; * = disturbed by other "
             "processes)", markdown_table(["n", *methods], body, "r" * (len(methods) + 1))),
            ("Crossovers, read from the measurements (time: the table above; memory: the cache bytes table below)",
             crossings),
            ("Slopes (log-log fits over the measured n)", lines)]


def match3_tables(rows: list[dict], stats: dict) -> list[tuple[str, list[str]]]:
    trained = [[r["layer"], r["steps"], r["test_accuracy"], r["train_seconds"]] for r in rows if r["part"] == "trained"]
    decode = [[r["decode_cache"] if r["decode_cache"] == "none" else f"poly, degree {r['degree']}", r["test_accuracy"]]
              for r in rows if r["part"] != "trained"]
    return [
        (f"Match3 (M={stats['M']}, N={stats['N']}; hidden 32, 4 heads, head_dim 8, poly_feature_dim 8, degree 2), "
         "test accuracy", 
         markdown_table(["layer", "steps", "test accuracy (answer tokens)", "train seconds"], trained, "lrrr")),
        ("The exact-trained model decoded through the poly cache",
         markdown_table(["cache", "test accuracy"], decode, "lr")
         + ["", f"Trained scores |scale·<q, k1 ⊙ k2>| of its layer on 20 test sequences: median {stats['median']:.2f}, "
                f"99th percentile {stats['p99']:.2f}, max {stats['max']:.2f}."]),
    ]


def throughput_tables(throughput: list[dict], memory: list[dict]) -> list[tuple[str, list[str]]]:
    Ts = sorted({r["T"] for r in throughput})
    layers = list(dict.fromkeys(r["layer"] for r in throughput))
    body = [[T] + [next((f"{r['tokens_per_second']:.0f}" + ("*" if disturbed(r) else "") for r in throughput
                         if r["T"] == T and r["layer"] == m), "not run") for m in layers] for T in Ts]
    mem_T = sorted({r["T"] for r in memory})
    mem_layers = list(dict.fromkeys((r["layer"], r["cache"]) for r in memory))
    mem_body = [[T] + [next(f"{r['bytes']:,} ({r['bytes_per_token']:.1f}/token)" for r in memory
                            if r["T"] == T and (r["layer"], r["cache"]) == lc) for lc in mem_layers] for T in mem_T]
    return [
        ("Training throughput, tokens/s (forward + backward, one layer, hidden 64, 2 heads; * = disturbed)",
         markdown_table(["T", *layers], body, "r" * (len(layers) + 1))),
        ("Cache bytes per layer after T tokens",
         markdown_table(["T", *(f"{lt} ({c})" for lt, c in mem_layers)], mem_body, "r" * (len(mem_layers) + 1))),
    ]


def disturbed(row: dict) -> bool:
    """The row's disturbed flag, a bool when measured and the string 'True'/'False' when read back from CSV."""
    return row["disturbed"] in (True, "True")


CSVS = ("error", "runtime", "throughput", "memory", "match3")


def render(folder: Path) -> str:
    """tables.md from the folder's CSVs and run record alone (the publishing convention in harness.py)."""
    run = read_run_record(folder)
    err, runtime, throughput, memory, match3 = (read_csv(Path(folder) / f"{name}.csv") for name in CSVS)
    sections = [*error_tables(err), *runtime_tables(runtime, memory), *match3_tables(match3, run["match3_stats"]),
                *throughput_tables(throughput, memory),
                ("Run", [f"Total wall time {run['seconds']:.0f} s; feature counts r = C(d+g, g) at d={D}: "
                         + ", ".join(f"g={g}: {num_features(D, g):,}" for g in run["degrees"]) + "."])]
    return render_document(run, sections)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default: docs/bench_poly/ for a full run)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--from-csv", type=Path, default=None, metavar="FOLDER",
                        help="measure nothing: rebuild tables.md and the plot from FOLDER's CSVs and run.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine slows it least)")
    parser.add_argument("--queries", type=int, default=8, help="last positions the error is measured on")
    parser.add_argument("--max-exact-n", type=int, default=4096, help="largest n the causal exact prefill is timed at")
    parser.add_argument("--max-exact-train", type=int, default=256, help="largest T exact training is timed at")
    parser.add_argument("--wait-idle", type=float, default=0.0, help="retry disturbed timings for up to this long")
    parser.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "bench-poly", help="training runs' folder")
    args = parser.parse_args(argv)
    if args.from_csv is not None:
        return args
    full = not args.quick and args.queries == 8 and args.max_exact_n == 4096 and args.max_exact_train == 256
    args.out = output_dir(parser, args.out, NAME, full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_csv is not None:
        err, runtime, throughput = (read_csv(args.from_csv / f"{name}.csv") for name in CSVS[:3])
        plot(err, runtime, throughput, args.from_csv / f"{NAME}.png")
        print(publish(args.from_csv, render))
        return 0
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    load_before = load_snapshot()
    started = time.perf_counter()
    err = error_rows(sizes, args.queries if not args.quick else 2)
    runtime = runtime_rows(sizes, args.max_exact_n, args.wait_idle)
    throughput = throughput_rows(sizes, args.max_exact_train, args.wait_idle)
    memory = memory_rows(sizes)
    match3, stats = match3_rows(sizes, args.work_dir, args.quick)
    load_after = load_snapshot()
    record = machine()
    for name, rows in (("error", err), ("runtime", runtime), ("throughput", throughput), ("memory", memory),
                       ("match3", match3)):
        write_csv(args.out / f"{name}.csv", rows, record)
    plot(err, runtime, throughput, args.out / f"{NAME}.png")
    write_run_record(args.out, run_record(
        f"scripts.bench.{NAME}", argv, "Polynomial tensor attention (Alman & Song)", record,
        describe_load(load_before, load_after), match3_stats=stats, degrees=list(sizes["degrees"]),
        seconds=round(time.perf_counter() - started, 1)))
    text = publish(args.out, render)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
