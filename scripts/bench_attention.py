"""Benchmark exact tensor attention (tiled `tensor_attention`) against the naive reference on this CPU.

For each T and mask mode it times forward (no grad) and forward+backward, and reports achieved GFLOP/s counting
useful flops only (4*d per allowed (query, a, b) pair forward, three times that for forward+backward), the
ratio to this machine's fp32 `torch.mm` rate measured in the same run, the speed-up over
`naive_tensor_attention` where that fits in memory, and peak memory. Writes a CSV and a PNG to --out.

Peak memory is the growth of the process's peak resident set (Linux VmHWM, reset through
/proc/self/clear_refs) over one call, after returning freed heap pages to the OS (malloc_trim), so it counts
every byte the call touched, inputs' gradients included, not only torch tensors.

    python scripts/bench_attention.py --out docs/
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import os
import time
from pathlib import Path

import torch

from hf_tensor_attn.ops import naive_tensor_attention, tensor_attention

MODES = {"causal": (None, None), "window": (128, 32)}


def cpu_busy(seconds: float = 0.5) -> float:
    """Fraction of all cores busy over a short sample (/proc/stat), i.e. load from other processes while we sleep."""
    def sample():
        ticks = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


WAIT_IDLE_S = 0.0


def wait_for_idle_cpu(threshold: float = 0.15) -> None:
    """On a shared machine, wait (at most --wait-idle seconds) until other processes leave the cores alone."""
    deadline = time.monotonic() + WAIT_IDLE_S
    while WAIT_IDLE_S > 0 and time.monotonic() < deadline and os.path.exists("/proc/stat"):
        if cpu_busy() < threshold:
            return


def best_time(fn, repeats: int) -> float:
    wait_for_idle_cpu()
    fn()  # warm-up: first-touch of buffers, MKL/OpenMP start-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def mm_gflops(repeats: int = 5) -> float:
    """Best fp32 torch.mm rate over two square sizes: the machine's practical GEMM peak."""
    rates = []
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        rates.append(2 * n**3 / best_time(lambda: torch.mm(a, b), repeats) / 1e9)
    return max(rates)


_libc = ctypes.CDLL("libc.so.6") if os.path.exists("/proc/self/clear_refs") else None


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_memory_mb(fn) -> float | None:
    """Peak resident-set growth of one call, in MiB (None where /proc/self/clear_refs is unavailable)."""
    if _libc is None:
        return None
    gc.collect()
    _libc.malloc_trim(0)
    base = _rss_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fn()
    return (_rss_kb("VmHWM:") - base) / 1024


def allowed_pairs_count(T: int, w1, w2) -> int:
    t = torch.arange(T, dtype=torch.int64)
    n1 = (t + 1).clamp(max=w1) if w1 else t + 1
    n2 = (t + 1).clamp(max=w2) if w2 else t + 1
    return int((n1 * n2).sum())


def make_inputs(B, H, T, D):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, D, generator=g) for _ in range(5)], torch.randn(B, H, T, D, generator=g)


def calls(fn, inputs, dout, scale, w1, w2):
    def forward():
        with torch.no_grad():
            fn(*inputs, scale=scale, w1=w1, w2=w2)

    def forward_backward():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        out = fn(*leaves, scale=scale, w1=w1, w2=w2)
        torch.autograd.grad(out, leaves, dout)

    return forward, forward_backward


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/", help="folder for bench_attention.csv and bench_attention.png")
    parser.add_argument("--T", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--naive-max-T", type=int, default=256, help="largest T the naive op is run at")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--wait-idle", type=float, default=0.0,
        help="before each timing wait up to this many seconds for the other processes to leave the CPU idle",
    )
    args = parser.parse_args()
    global WAIT_IDLE_S
    WAIT_IDLE_S = args.wait_idle
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    B, H, D = 1, args.heads, args.d
    scale = D**-0.5

    mm_rate = mm_gflops()
    print(f"torch {torch.__version__}, {args.threads} threads; fp32 torch.mm: {mm_rate:.0f} GFLOP/s")
    rows = []
    header = (
        f"{'mode':7} {'T':>5} {'fwd ms':>8} {'GFLOP/s':>8} {'of mm':>6} {'f+b ms':>8} {'GFLOP/s':>8} {'of mm':>6} "
        f"{'x naive f':>9} {'x naive fb':>10} {'peak MiB f/fb':>14} {'naive MiB f/fb':>15}"
    )
    print(header)
    for mode, (w1, w2) in MODES.items():
        for T in args.T:
            inputs, dout = make_inputs(B, H, T, D)
            flops = 4 * D * allowed_pairs_count(T, w1, w2) * B * H
            repeats = args.repeats if T <= 512 else max(1, args.repeats - 1)
            fwd, fwd_bwd = calls(tensor_attention, inputs, dout, scale, w1, w2)
            row = {"mode": mode, "T": T, "d": D, "B": B, "H": H, "w1": w1, "w2": w2, "useful_gflop_fwd": flops / 1e9}
            row["fwd_s"] = best_time(fwd, repeats)
            row["fwdbwd_s"] = best_time(fwd_bwd, repeats)
            row["fwd_gflops"] = flops / row["fwd_s"] / 1e9
            row["fwdbwd_gflops"] = 3 * flops / row["fwdbwd_s"] / 1e9
            row["fwd_of_mm"] = row["fwd_gflops"] / mm_rate
            row["fwdbwd_of_mm"] = row["fwdbwd_gflops"] / mm_rate
            row["peak_mb_fwd"] = peak_memory_mb(fwd)
            row["peak_mb_fwdbwd"] = peak_memory_mb(fwd_bwd)
            if T <= args.naive_max_T:
                nfwd, nfwd_bwd = calls(naive_tensor_attention, inputs, dout, scale, w1, w2)
                row["naive_fwd_s"] = best_time(nfwd, repeats)
                row["naive_fwdbwd_s"] = best_time(nfwd_bwd, repeats)
                row["speedup_fwd"] = row["naive_fwd_s"] / row["fwd_s"]
                row["speedup_fwdbwd"] = row["naive_fwdbwd_s"] / row["fwdbwd_s"]
                row["naive_peak_mb_fwd"] = peak_memory_mb(nfwd)
                row["naive_peak_mb_fwdbwd"] = peak_memory_mb(nfwd_bwd)
            row["mm_gflops"] = mm_rate
            rows.append(row)
            fmt = lambda key, spec: format(row[key], spec) if row.get(key) is not None else "-"
            print(
                f"{mode:7} {T:5d} {row['fwd_s'] * 1e3:8.1f} {row['fwd_gflops']:8.1f} {row['fwd_of_mm']:6.0%} "
                f"{row['fwdbwd_s'] * 1e3:8.1f} {row['fwdbwd_gflops']:8.1f} {row['fwdbwd_of_mm']:6.0%} "
                f"{fmt('speedup_fwd', '9.1f')} {fmt('speedup_fwdbwd', '10.1f')} "
                f"{fmt('peak_mb_fwd', '6.1f'):>6}/{fmt('peak_mb_fwdbwd', '<7.1f')} "
                f"{fmt('naive_peak_mb_fwd', '7.1f'):>7}/{fmt('naive_peak_mb_fwdbwd', '<7.1f')}",
                flush=True,
            )
    mm_after = mm_gflops()
    print(f"fp32 torch.mm after the run: {mm_after:.0f} GFLOP/s (ratios use the first measurement)")

    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(out_dir / "bench_attention.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, mm_rate, out_dir / "bench_attention.png")
    print(f"wrote {out_dir / 'bench_attention.csv'} and {out_dir / 'bench_attention.png'}")


def plot(rows, mm_rate, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in MODES:
        sel = [r for r in rows if r["mode"] == mode]
        Ts = [r["T"] for r in sel]
        ax_rate.plot(Ts, [r["fwd_gflops"] for r in sel], "o-", label=f"{mode} forward")
        ax_rate.plot(Ts, [r["fwdbwd_gflops"] for r in sel], "s--", label=f"{mode} forward+backward")
        ax_mem.plot(Ts, [r["peak_mb_fwdbwd"] for r in sel], "s--", label=f"{mode} tiled fwd+bwd")
        naive = [r for r in sel if r.get("naive_peak_mb_fwdbwd") is not None]
        if naive:
            ax_mem.plot([r["T"] for r in naive], [r["naive_peak_mb_fwdbwd"] for r in naive], "x:", label=f"{mode} naive fwd+bwd")
    ax_rate.axhline(mm_rate, color="gray", lw=1, label="fp32 torch.mm")
    ax_rate.set(xscale="log", xlabel="T", ylabel="useful GFLOP/s", title="tensor attention, d=64, B*H=4")
    ax_mem.set(xscale="log", yscale="log", xlabel="T", ylabel="peak RSS growth (MiB)", title="peak memory of one call")
    for ax in (ax_rate, ax_mem):
        ax.set_xticks(sorted({r["T"] for r in rows}), labels=[str(t) for t in sorted({r["T"] for r in rows})])
        ax.set_xticks([], minor=True)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
