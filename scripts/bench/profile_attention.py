"""Where the CPU time of exact tensor attention goes, beside its rate as a share of this machine's torch.mm.

For windowed and causal attention (forward, forward+backward) and the four-cache decode step, one call runs under
torch.profiler and each op's self CPU time is put in a category: GEMM (bmm, baddbmm, mm, matmul), exp, masks and
clamps (with the compiled tile loops' own time: their mask loops), other elementwise passes, reductions, scatter
(index_add), copies. Separately, the op is timed interleaved
with torch.mm (mm, op, mm) so the "of mm" ratio compares them under the same load.

Before and after a change: --baseline DIR profiles the package of another checkout of this repository (e.g. a
`git worktree add /tmp/before <commit>`) with this script, in a child process that runs each job just before the
same job runs on this checkout, so both see the same load; the table gets a row for each.

Writes profile_attention.csv, profile_attention.png and tables.md to --out (default docs/profile_attention/ for a
full run, runs/bench/profile_attention/ for --quick or other sizes):

    python -m scripts.bench.profile_attention --wait-idle 60
    python -m scripts.bench.profile_attention --baseline /tmp/before --wait-idle 60
    python -m scripts.bench.profile_attention --quick --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `scripts.bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _import_package_from(checkout: Path) -> None:
    """Make `hf_tensor_attn` the package of another checkout (a --baseline child process): registered under its own
    name before anything imports it, so every later import, ours and its own, resolves inside that folder."""
    init = checkout / "hf_tensor_attn" / "__init__.py"
    if not init.is_file():
        sys.exit(f"--code {checkout}: no hf_tensor_attn/__init__.py there; pass the root of a checkout of this repository")
    spec = importlib.util.spec_from_file_location("hf_tensor_attn", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["hf_tensor_attn"] = module
    spec.loader.exec_module(module)


if __name__ == "__main__" and "--code" in sys.argv[:-1]:  # a --baseline child: before the imports below
    _import_package_from(Path(sys.argv[sys.argv.index("--code") + 1]).resolve())

import torch
from torch.profiler import ProfilerActivity, profile

from hf_tensor_attn.ops import four_cache_decode, tensor_attention
from scripts.bench.bench_attention import allowed_pairs_count
from scripts.bench.harness import (
    code_version, describe_load, load_snapshot, machine, markdown_table, measure, mm_gflops, output_dir, publish, pyplot,
    read_csv, read_run_record, render_document, run_record, write_csv, write_run_record,
)

NAME = "profile_attention"
CASES = {"window 128x32": (128, 32), "window 512x32": (512, 32), "causal": (None, None)}
CATEGORIES = {
    "GEMM": ("bmm", "baddbmm", "baddbmm_", "mm", "addmm", "addmm_", "matmul"),
    "exp": ("exp", "exp_"),
    # out-of-place addcmul is the masks' fill + s * keep (`tiles.Masker.apply`); addcmul_ accumulates
    "mask/clamp": ("clamp", "clamp_min", "clamp_min_", "masked_fill", "masked_fill_", "where", "addcmul"),
    # the compiled ops' own time (their ATen calls are events of their own): their loops over row products, the
    # tiles' shift + exp + mask pass, sums over the row keys and row-key gradients (so "exp" is the Python loops' only);
    # the decode step's max and exp passes, and its small tiles' products
    "C++ loops": ("hf_tensor_attn_cpu::forward_tiles", "hf_tensor_attn_cpu::backward_tiles",
                  "hf_tensor_attn_cpu::decode_step"),
    "elementwise": ("mul", "mul_", "add", "add_", "addcmul_", "sub", "sub_", "div", "div_", "neg", "log", "log_",
                    "fill_", "zero_"),
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
        if event.key.startswith(("aten::", "hf_tensor_attn::", "hf_tensor_attn_cpu::")):
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
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="also profile the package of the checkout DIR (the 'before' of a change), job by job")
    parser.add_argument("--code", type=Path, default=None, help=argparse.SUPPRESS)  # set by --baseline for its child
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child: jobs named on stdin
    args = parser.parse_args(argv)
    if args.baseline is not None and not (args.baseline / "hf_tensor_attn" / "__init__.py").is_file():
        parser.error(f"--baseline {args.baseline}: no hf_tensor_attn/__init__.py there; pass the root of a checkout "
                     "of this repository (e.g. made by `git worktree add`)")
    if args.from_csv is not None:
        return args
    full = not args.quick and (args.T, args.causal_T, args.d, args.heads, args.threads) == (1024, 512, 64, 4, 2)
    if args.quick:
        args.T, args.causal_T, args.d, args.threads = 48, 24, 16, 1
    if not args.serve:  # a --baseline child writes nothing
        args.out = output_dir(parser, args.out, NAME, full)
    return args


TITLE = "Where the time of tensor attention goes (CPU)"


def render(folder: Path) -> str:
    """tables.md from the CSV and the run record alone (the publishing convention in harness.py)."""
    record = read_run_record(folder)
    rows = read_csv(Path(folder) / f"{NAME}.csv")
    cats = [*CATEGORIES, "other"]
    compared = any(r.get("code") == "baseline" for r in rows)
    def code(r):  # the before/after column, present only in a --baseline run
        return ["before" if r["code"] == "baseline" else "after"] if compared else []

    table = [[r["case"], r["pass"], *code(r), f"{r['ms']:.1f}", f"{r['gflops']:.0f}", f"{r['mm_gflops']:.0f}",
              f"{r['of_mm']:.0%}", *(f"{r['share_' + c]:.0%}" for c in cats)] for r in rows]
    header = ["case", "pass", *(["code"] if compared else []), "ms", "GFLOP/s", "torch.mm GFLOP/s", "of mm",
              *(f"{c} %" for c in cats)]
    sections = [(f"d={record['d']}, B*H={record['heads']}, {record['threads']} threads, fp32; share of self CPU time",
                 markdown_table(header, table, "ll" + "l" * compared + "rrrr" + "r" * len(cats)))]
    if compared:
        sections[0][1][:0] = [f"Each case ran on the code before the change ({record['baseline']}), then on this "
                              f"code ({record['code']}), one after the other.", ""]
    return render_document(record, sections)


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
    if args.serve:  # a --baseline child: runs the jobs whose numbers arrive on stdin, answers with their rows
        for line in sys.stdin:
            print(ROW + json.dumps(profile_job(*jobs[int(line)], args, mm_sizes, timing, "baseline")), flush=True)
        return []
    baseline = None if args.baseline is None else Baseline(args, argv)
    for index, job in enumerate(jobs):
        if baseline is not None:
            rows.append(baseline.row(index))
        rows.append(profile_job(*job, args, mm_sizes, timing, "current"))
        for row in rows[-1 - (baseline is not None):]:
            print(f"{row['case']} {row['pass']} ({row['code']}): {row['of_mm']:.0%} of mm", flush=True)
    if baseline is not None:
        baseline.close()
    load_after = load_snapshot()
    record = machine()
    write_csv(args.out / f"{NAME}.csv", rows, record)
    plot(rows, args.out / f"{NAME}.png")
    baseline = {} if args.baseline is None else {"baseline": code_version(args.baseline.resolve())}
    write_run_record(args.out, run_record(f"scripts.bench.{NAME}", argv, TITLE, record,
                                          describe_load(load_before, load_after), d=args.d, heads=args.heads,
                                          threads=args.threads, **baseline))
    text = publish(args.out, render)
    print(text)
    return rows


def profile_job(case, what, fn, flops, args, mm_sizes, timing, code) -> dict:
    """Times one call between two torch.mm measurements, then profiles it once."""
    fn()  # warm-up: workspace and caches
    mm_before = mm_gflops(mm_sizes, **timing)
    seconds = measure(fn, **timing).best
    mm_after = mm_gflops(mm_sizes, **timing)
    rate = flops / seconds / 1e9
    return {"case": case, "pass": what, "code": code, "d": args.d, "heads": args.heads, "ms": seconds * 1e3,
            "gflops": rate, "mm_gflops": (mm_before + mm_after) / 2, "of_mm": rate / ((mm_before + mm_after) / 2),
            **{f"share_{cat}": share for cat, share in profile_shares(fn).items()}}


ROW = "profile-row: "  # marks the child's answers among anything else it prints


class Baseline:
    """The --baseline checkout's package, profiled by this script in one child process (one import of the package,
    which takes seconds) that runs job after job when asked."""

    def __init__(self, args, argv):
        own = list(sys.argv[1:] if argv is None else argv)
        if "--baseline" in own:  # the child gets the same sizes and timing options, not the comparison itself
            at = own.index("--baseline")
            del own[at : at + 2]
        own = [a for a in own if not a.startswith("--baseline=")]
        self.where = args.baseline
        self.child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *own, "--code", str(args.baseline.resolve()), "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def row(self, index: int) -> dict:
        self.child.stdin.write(f"{index}\n")
        self.child.stdin.flush()
        for line in self.child.stdout:
            if line.startswith(ROW):
                return json.loads(line[len(ROW):])
        raise SystemExit(f"--baseline {self.where}: the child process ended (exit code {self.child.wait()}) "
                         f"before answering job {index}; its error output is above")

    def close(self) -> None:
        self.child.stdin.close()
        self.child.wait()


def plot(rows, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['case']}\n{r['pass']}" + ("\n(before)" if r.get("code") == "baseline" else "") for r in rows]
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
