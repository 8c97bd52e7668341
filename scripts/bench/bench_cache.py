"""Decode cost of the tensor-attention cache layouts against the context length i, measured on this machine.

    (a) four_cache, factorized: S = (K1 * q) K2ᵀ, softmax, P V2 (the package's decode; O(i d) memory)
    (b) four_cache, explicit Kronecker: form K1 ⊘ K2 and V1 ⊘ V2 (i² x d) every step, then Ṽᵀ softmax(K̃ q),
        the accounting of the paper's Theorem 4.3
    (c) two_cache: the stored pair rows K̃, Ṽ (O(i² d) memory), Ṽᵀ softmax(K̃ q)

A step is one decode token at context i through the cache layer: `update` with the new token, then `attend`
(for (b) the same update, then `kronecker_decode` on the cached streams). The step time is the best of
--reps (the least disturbed on a shared machine); the median is in the CSV too. The machine's fp32 `torch.mm`
rate is measured in the same run, before each context length, and its best is the reference of the GEMM share.
Memory is the bytes the cache layer holds (`memory_bytes()`, spare capacity included); (a)'s per-step scratch
(a block of scores, K1 * q and P V2 rows; reused across steps) is reported beside it.

(c) runs until the two_cache memory guard refuses (--two-budget, default a quarter of RAM capped at 6 GiB).

    python scripts/bench_cache.py --out docs/
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import time
from pathlib import Path

import torch

from hf_tensor_attn.cache import FourCacheLayer, TwoCacheLayer, TwoCacheMemoryError
from hf_tensor_attn.cache.two import default_memory_budget
from hf_tensor_attn.ops.decode import decode_scratch_elements, kronecker_decode, release_decode_workspace

B, H, D = 1, 4, 64
DTYPE = torch.float32
METHODS = {
    "a": "four_cache factorized",
    "b": "four_cache explicit Kronecker (Thm 4.3 accounting)",
    "c": "two_cache",
}


def busy_fraction(seconds: float = 0.3) -> float | None:
    """Share of all cores busy over a short sleep (/proc/stat): load from other processes."""
    if not os.path.exists("/proc/stat"):
        return None

    def sample():
        ticks = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def wait_for_idle(max_seconds: float, busy_below: float = 0.25) -> None:
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        busy = busy_fraction(0.5)
        if busy is None or busy < busy_below:
            return


def timed(fn, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def mm_gflops(reps: int) -> float:
    n = 1024
    a, b = torch.randn(n, n, dtype=DTYPE), torch.randn(n, n, dtype=DTYPE)
    return 2 * n**3 / min(timed(lambda: torch.mm(a, b), reps, warmup=2)) / 1e9


def streams(i: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, i + 1, 2 * D, generator=g, dtype=DTYPE)  # k1 | k2 of i tokens and one to decode
    v = torch.randn(B, H, i + 1, 2 * D, generator=g, dtype=DTYPE)
    q = torch.randn(B, H, 1, D, generator=g, dtype=DTYPE)
    return k, v, q


def bench_four(i: int, reps: int, explicit: bool):
    """(a) or (b): the four-matrix layer holding i - 1 tokens; a step appends token i and attends."""
    k, v, q = streams(i)
    layer = FourCacheLayer()
    layer.update(k[:, :, : i - 1], v[:, :, : i - 1])
    scale = D**-0.5

    def step():
        layer.update(k[:, :, i - 1 : i], v[:, :, i - 1 : i])
        if explicit:
            k1, k2 = layer.keys.chunk(2, dim=-1)
            v1, v2 = layer.values.chunk(2, dim=-1)
            kronecker_decode(q, k1, k2, v1, v2, scale=scale)
        else:
            layer.attend(q, scale=scale)
        layer.crop(-1)  # back to i - 1 tokens, so every step decodes at context i

    with torch.no_grad():
        times = timed(step, reps)
    return times, layer.memory_bytes()


def bench_two(i: int, reps: int, budget: int):
    """(c): the two-matrix layer holding i - 1 tokens' pairs in buffers sized for i tokens; a step appends
    token i (its 2i - 1 new pair rows) and attends. Crop-then-append keeps the step at context i without
    doubling the buffers on the first step."""
    k, v, q = streams(i)
    layer = TwoCacheLayer(max_memory_bytes=budget)
    scale = D**-0.5
    with torch.no_grad():
        layer.update(k[:, :, :i], v[:, :, :i])
        layer.attend(q, scale=scale)  # forms all i^2 rows, buffers of exactly i^2 rows
        layer.crop(-1)

        def step():
            layer.update(k[:, :, i - 1 : i], v[:, :, i - 1 : i])
            layer.attend(q, scale=scale)
            layer.crop(-1)

        times = timed(step, reps)
    layer.update(k[:, :, i - 1 : i], v[:, :, i - 1 : i])
    held = layer.memory_bytes()
    del layer
    return times, held


def fit_slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/", help="folder for bench_cache.csv / .png / .md (default docs/)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-four", type=int, default=4096, help="largest i for (a); (b) stops at min(this, 2048)")
    parser.add_argument("--two-budget", type=int, default=None,
                        help="max_memory_bytes for (c); default min(RAM/4, 6 GiB)")
    parser.add_argument("--fit-from", type=int, default=256, help="fit the exponents on i >= this")
    parser.add_argument("--quick", action="store_true", help="small sizes, few reps (a smoke run)")
    parser.add_argument("--wait-idle", type=float, default=0.0,
                        help="before each i, wait up to this many seconds for other processes to leave the cores")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.quick:
        sizes_four, max_b, reps_of, fit_from = [16, 32, 64], 64, (lambda i: 3), 16
    else:
        sizes_four = [2**p for p in range(6, 13) if 2**p <= args.max_four]
        max_b, fit_from = min(args.max_four, 2048), args.fit_from
        reps_of = lambda i: 15 if i <= 512 else (7 if i <= 1024 else 5)  # noqa: E731
    top = 6 if args.quick else 12  # (c) tries i up to 2^top, in steps of sqrt(2), until the guard refuses
    sizes_two = sorted({int(round(2 ** (p / 2))) for p in range(2 * int(math.log2(sizes_four[0])), 2 * top + 1)})
    budget = args.two_budget or min(default_memory_budget(torch.device("cpu")), 6 << 30)

    busy_before = busy_fraction()
    rows, mm_rates = [], []
    stopped = None
    for i in sorted(set(sizes_four) | set(sizes_two)):
        wait_for_idle(args.wait_idle)
        mm_rates.append(mm_gflops(reps=10))
        flops = 4 * i * i * D * H * B
        todo = []
        if i in sizes_four:  # (a) is cheap: many more steps, so its best is less disturbed by other processes
            todo.append(("a", lambda: bench_four(i, 4 * reps_of(i), explicit=False)))
            if i <= max_b:
                todo.append(("b", lambda: bench_four(i, reps_of(i), explicit=True)))
        if i in sizes_two and stopped is None:
            todo.append(("c", lambda: bench_two(i, reps_of(i), budget)))
        for method, run in todo:
            if i >= 512:
                wait_for_idle(args.wait_idle)
            try:
                times, held = run()
            except TwoCacheMemoryError as e:
                stopped = (i, str(e))
                print(f"(c) stops at i={i}: {e}")
                continue
            best, median = min(times), statistics.median(times)
            scratch = decode_scratch_elements(B, H, i, i, D) * 4 if method == "a" else 0
            rows.append(dict(method=method, i=i, step_ms_best=best * 1e3, step_ms_median=median * 1e3,
                             gflops_best=flops / best / 1e9, cache_bytes=held, scratch_bytes=scratch))
            print(f"{method} i={i:5d}  {best * 1e3:9.2f} ms (median {median * 1e3:9.2f})  {flops / best / 1e9:7.1f} GFLOP/s"
                  f"  cache {held / 2**20:10.2f} MiB")
        release_decode_workspace()
    busy_after = busy_fraction()
    mm_rate = max(mm_rates)

    with open(out / "bench_cache.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    by = {m: [r for r in rows if r["method"] == m] for m in METHODS}
    slopes = {}
    for m, rs in by.items():
        fit = [r for r in rs if r["i"] >= fit_from]
        if len(fit) >= 2:
            slopes[m] = (fit_slope([r["i"] for r in fit], [r["step_ms_best"] for r in fit]),
                         fit_slope([r["i"] for r in fit], [r["cache_bytes"] for r in fit]))
    i_share = 1024 if any(r["i"] == 1024 for r in by["a"]) else by["a"][-1]["i"]
    a_share = next(r for r in by["a"] if r["i"] == i_share)
    share = a_share["gflops_best"] / mm_rate
    share_median = (4 * i_share**2 * D * H * B / (a_share["step_ms_median"] / 1e3) / 1e9) / statistics.median(mm_rates)

    common = sorted({r["i"] for r in by["c"]} & {r["i"] for r in by["a"]} & {r["i"] for r in by["b"]})
    i_cmp = common[-1]
    t = {m: next(r["step_ms_best"] for r in by[m] if r["i"] == i_cmp) for m in METHODS}
    verdict = verdict_text(t, i_cmp, slopes, stopped)

    plot(by, slopes, out / "bench_cache.png", fit_from)
    result = dict(rows=rows, mm_gflops=mm_rate, share=share, share_median=share_median, i_share=i_share,
                  slopes=slopes, verdict=verdict, stopped=stopped, busy=(busy_before, busy_after),
                  threads=args.threads, budget=budget, fit_from=fit_from)
    (out / "bench_cache.md").write_text(markdown(result))
    print_summary(result)
    return result


def ratio_words(slow: float, fast: float) -> str:
    """'3.2x faster' / '3.2x slower' for a step time `fast` against `slow`."""
    return f"{slow / fast:.1f}x faster" if slow >= fast else f"{fast / slow:.1f}x slower"


def verdict_text(t, i, slopes, stopped) -> str:
    c_vs_b, c_vs_a = t["b"] / t["c"], t["c"] / t["a"]
    streamed = 2 * i * i * H * D * 4  # bytes of K̃ and Ṽ one two_cache step reads
    text = (
        f"At i = {i}, two_cache (c) decodes {ratio_words(t['b'], t['c'])} than the four-cache step that forms "
        f"K1 ⊘ K2 and V1 ⊘ V2 explicitly (b), and {ratio_words(t['a'], t['c'])} than the factorized four-cache "
        f"step (a). Each (c) step streams its {streamed / 1e9:.2f} GB of stored pair rows "
        f"({streamed / (t['c'] / 1e3) / 1e9:.1f} GB/s), while (b) recomputes the same rows in cache-sized chunks "
        "and (a) does the same O(i² d) score and value flops as two GEMMs from O(i d) memory. "
    )
    if c_vs_b > 1 and c_vs_a > 1:
        text += (
            "So Theorem 4.3's saving holds as measured only against the explicit-Kronecker accounting; it is not a "
            "saving over the factorized four-cache step, and it costs O(i² d) memory."
        )
    elif c_vs_a <= 1:
        text += "Here the two-matrix layout is faster than both, as Theorem 4.3 claims."
    else:
        text += (
            "So, as measured, Theorem 4.3's claim does not hold on this machine even against the explicit-Kronecker "
            "step: skipping the Kronecker product saves flops, but reading i² d stored numbers per step costs more "
            "than recomputing them in cache; and the factorized step beats both."
        )
    if stopped:
        text += f" (c) could not go past i = {stopped[0]}: the memory guard refused its next growth."
    return text


def plot(by, slopes, path, fit_from) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    for m, rs in by.items():
        if not rs:
            continue
        xs = [r["i"] for r in rs]
        label_t = METHODS[m] + (f" (slope {slopes[m][0]:.2f})" if m in slopes else "")
        ax_t.loglog(xs, [r["step_ms_best"] for r in rs], "o-", label=f"({m}) {label_t}")
        if m != "b":  # (b) holds what (a) holds
            label_m = ("four_cache (a, b)" if m == "a" else METHODS[m]) + (f" (slope {slopes[m][1]:.2f})" if m in slopes else "")
            ax_m.loglog(xs, [r["cache_bytes"] / 2**20 for r in rs], "o-", label=label_m)
    a = by["a"]
    ax_m.loglog([r["i"] for r in a], [r["scratch_bytes"] / 2**20 for r in a], "x--", label="(a) per-step scratch (reused workspace, not in the cache)")
    ax_t.set(xlabel="context length i", ylabel="decode step (ms, best of reps)", title="decode time per step")
    ax_m.set(xlabel="context length i", ylabel="MiB", title="cache memory held (B=1, H=4, d=64, fp32)")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"tensor-attention KV-cache layouts (slopes fitted on i >= {fit_from})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(r) -> str:
    lines = [
        "## Cache layouts: decode time and memory",
        "",
        "![decode step time and cache memory against context length](docs/bench_cache.png)",
        "",
        f"One decode step (append a token, attend) at context length i, B = 1, H = 4, d = 64, fp32, "
        f"{r['threads']} CPU threads; best of several steps. `torch.mm` on this machine in the same run: "
        f"{r['mm_gflops']:.0f} GFLOP/s (fp32, 1024³).",
        "",
        "| i | (a) four, factorized ms | (a) GFLOP/s | (b) four, explicit K1⊘K2 ms | (c) two_cache ms | four_cache MiB | two_cache MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_i = {}
    for row in r["rows"]:
        by_i.setdefault(row["i"], {})[row["method"]] = row
    for i in sorted(by_i):
        d = by_i[i]
        cell = lambda m, key, fmt: format(d[m][key], fmt) if m in d else "—"  # noqa: E731
        mib = lambda m: f"{d[m]['cache_bytes'] / 2**20:.2f}" if m in d else "—"  # noqa: E731
        lines.append(f"| {i} | {cell('a', 'step_ms_best', '.2f')} | {cell('a', 'gflops_best', '.0f')} | "
                     f"{cell('b', 'step_ms_best', '.2f')} | {cell('c', 'step_ms_best', '.2f')} | {mib('a')} | {mib('c')} |")
    lines += ["", "Memory is what the cache layer holds (`memory_bytes()`): for two_cache the pair rows K̃, Ṽ with "
              "spare capacity, their (a, b) indices and the token streams it forms new pairs from.", "",
              f"Fitted exponents (log-log least squares on i >= {r['fit_from']}): time ∝ i^x, memory ∝ i^y. All three "
              "steps do Θ(i² d) work; an exponent below 2 comes from fixed per-step costs at the small end.", "",
              "| method | time x | memory y |", "|---|---:|---:|"]
    for m, (st, sm) in r["slopes"].items():
        lines.append(f"| ({m}) {METHODS[m]} | {st:.2f} | {sm:.2f} |")
    lines += [
        "",
        f"**GEMM share of (a)** at i = {r['i_share']}: {r['share'] * 100:.0f}% of this machine's `torch.mm` rate "
        f"(best step against best `mm`; medians against medians: {r['share_median'] * 100:.0f}%), counting 4·i²·d "
        "flops per head. The step is two batched GEMMs, (K1 ⊙ q) K2ᵀ and P V2, plus a softmax over the i² scores "
        "done in place in a reused scratch buffer (in blocks of at most 4M scores, so the scratch stays O(i d) "
        "plus one block).",
        "",
        f"**Theorem 4.3 (\"two-cache decodes faster by Ω(n²d)\"), as measured:** {r['verdict']}",
        "",
    ]
    if r["busy"][0] is not None:
        lines += [f"Other processes kept {r['busy'][0] * 100:.0f}% / {r['busy'][1] * 100:.0f}% of the cores busy "
                  "just before / after the run (a shared machine): best-of-reps times are the least disturbed.", ""]
    lines += ["Reproduce (about 3 minutes on 2 idle cores; writes CSV, PNG and this text; on a shared machine add "
              "`--wait-idle 45` to wait for idle cores before each measurement):", "", "```bash",
              "python scripts/bench_cache.py --out docs/", "```", ""]
    return "\n".join(lines)


def print_summary(r) -> None:
    print()
    print(f"torch.mm fp32: {r['mm_gflops']:.1f} GFLOP/s (best of the run)")
    for m, (st, sm) in r["slopes"].items():
        print(f"({m}) {METHODS[m]}: time ∝ i^{st:.2f}, memory ∝ i^{sm:.2f}")
    print(f"GEMM share of (a) at i={r['i_share']}: {r['share'] * 100:.1f}% (medians: {r['share_median'] * 100:.1f}%)")
    print("Theorem 4.3 verdict:", r["verdict"])


if __name__ == "__main__":
    main()
