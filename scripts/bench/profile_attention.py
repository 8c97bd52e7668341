"""Where the CPU time of exact tensor attention goes, beside its rate as a share of this machine's torch.mm.

For windowed and causal attention (forward, forward+backward) and the four-cache decode step, one call runs under
torch.profiler and each op's self CPU time is put in a category: GEMM (bmm, baddbmm, mm, matmul), exp, masks and
clamps, other elementwise passes, reductions, scatter (index_add), copies. Separately, the op is timed interleaved
with torch.mm (mm, op, mm) so the "of mm" ratio compares them under the same load.

Writes profile_attention.csv, profile_attention.png and tables.md to --out (default docs/profile_attention/ for a
full run, runs/bench/profile_attention/ for --quick or other sizes):

    python -m scripts.bench.profile_attention --wait-idle 60
    python -m scripts.bench.profile_attention --quick --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `scripts.bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch.profiler import ProfilerActivity, profile

from hf_tensor_attn.ops import four_cache_decode, tensor_attention
from scripts.bench.bench_attention import allowed_pairs_count
from scripts.bench.harness import (
    describe_load, load_snapshot, machine, markdown_table, measure, mm_gflops, output_dir, publish, pyplot, read_csv,
    read_run_record, render_document, run_record, write_csv, write_run_record,
)

NAME = "profile_attention"
CASES = {"window 128x32": (128, 32), "window 512x32": (512, 32), "causal": (None, None)}
CATEGORIES = {
    "GEMM": ("bmm", "baddbmm", "mm", "addmm", "matmul"),
    "exp": ("exp", "exp_"),
    "mask/clamp": ("clamp", "clamp_min", "clamp_min_", "masked_fill", "masked_fill_", "where"),
    "elementwise": ("mul", "mul_", "add", "add_", "addcmul", "addcmul_", "sub", "sub_", "div", "neg", "fill_", "zero_"),
    "reductions": ("sum", "amax", "max", "any", "cummax", "linalg_vector_norm"),
    "scatter": ("index_add_", "index_add"),
    "copies": ("copy_", "cat", "contiguous", "clone", "to", "_to_copy", "empty", "empty_strided", "zeros", "ones"),
}


def category(op: str) -> str:
    name = op.removeprefix("aten::")
    for cat, names in CATEGORIES.items():
        if name in names:
            return cat
    return "other"


def profile_shares(fn) -> dict[str, float]:
    """Share of self CPU time per category over one call of fn."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::") or event.key.startswith("hf_tensor_attn::"):
            totals[category(event.key)] += event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {cat: totals.get(cat, 0.0) / whole for cat in [*CATEGORIES, "other"]}


def calls(T, d, heads, w1, w2):
    g = torch.Generator().manual_seed(0)
    q, k1, k2, v1, v2, dout = (torch.randn(1, heads, T, d, generator=g) for _ in range(6))
    scale = d**-0.5

    def forward():
        with torch.no_grad():
            tensor_attention(q, k1, k2, v1, v2, scale=scale, w1=w1, w2=w2)

    def forward_backward():
        leaves = [t.detach().requires_grad_(True) for t in (q, k1, k2, v1, v2)]
        torch.autograd.grad(tensor_attention(*leaves, scale=scale, w1=w1, w2=w2), leaves, dout)

    def decode():
        with torch.no_grad():
            four_cache_decode(q[:, :, -1:], k1, k2, v1, v2, scale=scale)

    return forward, forward_backward, decode


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default: docs/profile_attention/ for a full run)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: T=48, d=16, short timings")
    parser.add_argument("--T", type=int, default=1024, help="sequence length of the windowed cases and the decode context")
    parser.add_argument("--causal-T", type=int, default=512,
                        help="sequence length of the causal case (its cost grows as T^3; bench_attention covers 1024)")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--wait-idle", type=float, default=0.0,
                        help="shared machine: retry timings disturbed by other processes for up to this many seconds")
    parser.add_argument("--from-csv", type=Path, default=None, metavar="FOLDER",
                        help="measure nothing: rebuild tables.md and the plot from FOLDER's CSV and run.json")
    args = parser.parse_args(argv)
    if args.from_csv is not None:
        return args
    full = not args.quick and (args.T, args.causal_T, args.d, args.heads, args.threads) == (1024, 512, 64, 4, 2)
    if args.quick:
        args.T, args.causal_T, args.d, args.threads = 48, 24, 16, 1
    args.out = output_dir(parser, args.out, NAME, full)
    return args


TITLE = "Where the time of tensor attention goes (CPU)"


def render(folder: Path) -> str:
    """tables.md from the CSV and the run record alone (the publishing convention in harness.py)."""
    record = read_run_record(folder)
    rows = read_csv(Path(folder) / f"{NAME}.csv")
    cats = [*CATEGORIES, "other"]
    table = [[r["case"], r["pass"], f"{r['ms']:.1f}", f"{r['gflops']:.0f}", f"{r['mm_gflops']:.0f}", f"{r['of_mm']:.0%}",
              *(f"{r['share_' + c]:.0%}" for c in cats)] for r in rows]
    return render_document(record, [
        (f"d={record['d']}, B*H={record['heads']}, {record['threads']} threads, fp32; share of self CPU time",
         markdown_table(["case", "pass", "ms", "GFLOP/s", "torch.mm GFLOP/s", "of mm", *(f"{c} %" for c in cats)],
                        table, "llrrrr" + "r" * len(cats)))])


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.from_csv is not None:
        rows = read_csv(args.from_csv / f"{NAME}.csv")
        plot(rows, args.from_csv / f"{NAME}.png")
        print(publish(args.from_csv, render))
        return rows
    torch.set_num_threads(args.threads)
    timing = dict(repeats=1, min_run_time=0.02) if args.quick else dict(repeats=2, min_run_time=0.3, wait_idle=args.wait_idle)
    mm_sizes = (128,) if args.quick else (1024,)
    load_before = load_snapshot()
    rows = []
    jobs = []
    for case, (w1, w2) in CASES.items():
        T = args.T if w1 else args.causal_T
        forward, forward_backward, decode = calls(T, args.d, args.heads, w1, w2)
        flops = 4 * args.d * allowed_pairs_count(T, w1, w2) * args.heads
        jobs += [(case, f"forward T={T}", forward, flops), (case, f"forward+backward T={T}", forward_backward, 3 * flops)]
        if case == "window 512x32":
            jobs.append(("four-cache decode", f"step at i={T}", decode, 4 * args.d * T**2 * args.heads))
    for case, what, fn, flops in jobs:
        fn()  # warm-up: workspace and caches
        mm_before = mm_gflops(mm_sizes, **timing)
        seconds = measure(fn, **timing).best
        mm_after = mm_gflops(mm_sizes, **timing)
        rate = flops / seconds / 1e9
        row = {"case": case, "pass": what, "d": args.d, "heads": args.heads, "ms": seconds * 1e3,
               "gflops": rate, "mm_gflops": (mm_before + mm_after) / 2, "of_mm": rate / ((mm_before + mm_after) / 2),
               **{f"share_{cat}": share for cat, share in profile_shares(fn).items()}}
        rows.append(row)
        print(f"{case} {what}: {row['of_mm']:.0%} of mm", flush=True)
    load_after = load_snapshot()
    record = machine()
    write_csv(args.out / f"{NAME}.csv", rows, record)
    plot(rows, args.out / f"{NAME}.png")
    write_run_record(args.out, run_record(f"scripts.bench.{NAME}", argv, TITLE, record,
                                          describe_load(load_before, load_after), d=args.d, heads=args.heads,
                                          threads=args.threads))
    text = publish(args.out, render)
    print(text)
    return rows


def plot(rows, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['case']}\n{r['pass']}" for r in rows]
    bottom = [0.0] * len(rows)
    for cat in [*CATEGORIES, "other"]:
        shares = [r[f"share_{cat}"] for r in rows]
        ax.bar(labels, shares, bottom=bottom, label=cat)
        bottom = [b + s for b, s in zip(bottom, shares)]
    for x, r in enumerate(rows):
        ax.text(x, 1.02, f"{r['of_mm']:.0%} of mm", ha="center", fontsize=7)
    ax.set(ylabel="share of self CPU time", ylim=(0, 1.12), title="where the time goes")
    ax.tick_params(axis="x", labelsize=6)
    ax.legend(fontsize=6, ncol=4, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
