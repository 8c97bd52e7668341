"""Decode cost of the tensor-attention cache layouts against the context length i, measured on this machine.

    (a) four_cache, factorized: S = (K1 * q) K2ᵀ, softmax, P V2 (the package's decode; O(i d) memory)
    (b) four_cache, explicit Kronecker: form K1 ⊘ K2 and V1 ⊘ V2 (i² x d) every step, then Ṽᵀ softmax(K̃ q),
        the accounting of the paper's Theorem 4.3 (scripts/bench/baselines.py)
    (c) two_cache: the stored pair rows K̃, Ṽ (O(i² d) memory), Ṽᵀ softmax(K̃ q)
    (d) poly: the polynomial state (degree 2, r = C(d + 2, 2) features per head; O(r d) memory whatever i)

A step is one decode token at context i through the cache layer: `update` with the new token, then `attend`
(for (b) the same update, then `kronecker_decode` on the cached streams). Steps are timed with the harness (best and
median block); the machine's fp32 `torch.mm` rate is measured in the same run, before each context length. (a)'s GEMM
share at i = 1024 and 4096 is measured again in `--rounds` interleaved rounds (torch.mm, step, torch.mm), each round's
step against the mean of its two torch.mm rates, so that a change in the machine's speed moves both alike. (c)'s
rate of reading its pair rows is compared with the machine's streaming read rate (`torch.sum` over 1 GiB) measured
just before it. (d)'s step does not depend on i: it is measured once, in `--rounds` interleaved rounds, its useful
flops (the update of S1 and S2 and the readout, 7 r d per head) against torch.mm and the bytes of S1 and S2 it reads
and writes against the streaming read rate. Memory is the bytes the cache layer holds (`memory_bytes()`, spare capacity
included); (a)'s per-step scratch (a block of scores, K1 * q and P V2 rows; reused across steps) is reported beside it.
(c) runs until the two_cache memory guard refuses (--two-budget, default a quarter of RAM capped at 6 GiB).

Writes bench_cache.csv, shares.csv (the interleaved rounds), poly.csv ((d)'s rounds), run.json, bench_cache.png and tables.md (= `render(out)`, the publishing convention of
scripts/bench/harness.py) to --out (default docs/bench_cache/ for a full run, runs/bench/bench_cache/ for --quick
or other sizes):

    python -m scripts.bench.bench_cache --wait-idle 45
    python -m scripts.bench.bench_cache --quick --out /tmp/smoke
    python -m scripts.bench.bench_cache --from-csv               # rebuild docs/bench_cache/tables.md
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `scripts.bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from hf_tensor_attn.cache import FourCacheLayer, PolyCacheLayer, TensorAttnConstants, TwoCacheLayer, TwoCacheMemoryError
from hf_tensor_attn.cache.two import default_memory_budget
from hf_tensor_attn.ops.exact.decode import decode_scratch_elements
from scripts.bench.baselines import kronecker_decode
from scripts.bench.harness import (
    between_mm, describe_load, load_snapshot, machine, markdown_table, measure, mm_gflops, output_dir, publish, pyplot,
    read_csv, read_gbps, read_run_record, rebuild_or_start, render_document, run_record, wait_for_idle, write_csv,
    write_run_record,
)

NAME = "bench_cache"
MODULE = "scripts.bench.bench_cache"
TITLE = "Cache layouts: decode step time and memory"
B, H, D = 1, 4, 64
DTYPE = torch.float32
METHODS = {
    "a": "four_cache factorized",
    "b": "four_cache explicit Kronecker (Thm 4.3 accounting)",
    "c": "two_cache",
}
DEFAULT_MAX_FOUR = 4096
CONSTANTS = TensorAttnConstants(scale=D**-0.5)  # every pair allowed: no windows
POLY_DEGREE, POLY_PROMPT = 2, 64


def streams(i: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, i + 1, 2 * D, generator=g, dtype=DTYPE)  # k1 | k2 of i tokens and one to decode
    v = torch.randn(B, H, i + 1, 2 * D, generator=g, dtype=DTYPE)
    q = torch.randn(B, H, 1, D, generator=g, dtype=DTYPE)
    return k, v, q


def four_step(i: int, explicit: bool):
    """(a) or (b): (step, layer), the four-matrix layer holding i - 1 tokens; a step appends token i and attends."""
    k, v, q = streams(i)
    layer = FourCacheLayer(CONSTANTS)
    layer.update(k[:, :, : i - 1], v[:, :, : i - 1])

    def step():
        layer.update(k[:, :, i - 1 : i], v[:, :, i - 1 : i])
        if explicit:
            k1, k2 = layer.keys.chunk(2, dim=-1)
            v1, v2 = layer.values.chunk(2, dim=-1)
            kronecker_decode(q, k1, k2, v1, v2, scale=CONSTANTS.scale)
        else:
            layer.attend(q)
        layer.crop(-1)  # back to i - 1 tokens, so every step decodes at context i

    return step, layer


def bench_four(i: int, timing: dict, explicit: bool):
    step, layer = four_step(i, explicit)
    with torch.no_grad():
        timed = measure(step, **timing)
    return timed, layer.memory_bytes()


def share_rounds(i: int, rounds: int, mm_sizes) -> list[dict]:
    """(a)'s step at context i in interleaved rounds (torch.mm, step, torch.mm): per round the step's median block
    and its rate against the mean of the two torch.mm rates around it."""
    step, _ = four_step(i, explicit=False)
    flops = 4 * i * i * D * H * B
    out = []
    with torch.no_grad():
        step()
        for round_ in range(rounds):
            seconds, before, after = between_mm(lambda: measure(step, repeats=1, min_run_time=0.1).median, mm_sizes)
            out.append(dict(i=i, round=round_, step_ms=seconds * 1e3, mm_gflops_before=before, mm_gflops_after=after,
                            share=flops / seconds / 1e9 / ((before + after) / 2)))
            print(f"(a) i={i} round {round_}: {out[-1]['share']:.0%} of torch.mm", flush=True)
    return out


def poly_rounds(rounds: int, mm_sizes, read_bytes: int) -> list[dict]:
    """(d): the `poly` cache layer after a prompt of POLY_PROMPT tokens; a step appends one token and attends (the
    state keeps its size). Per interleaved round (torch.mm, step, torch.mm): the step's median block, with the
    streaming read rate measured before the rounds."""
    k, v, q = streams(POLY_PROMPT)  # POLY_PROMPT tokens and one to decode
    layer = PolyCacheLayer(CONSTANTS, degree=POLY_DEGREE)
    prompt_q = torch.randn(B, H, POLY_PROMPT, D, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    out = []
    with torch.no_grad():
        layer.update(k[:, :, :POLY_PROMPT], v[:, :, :POLY_PROMPT])
        layer.attend(prompt_q)

        def step():
            layer.update(k[:, :, POLY_PROMPT:], v[:, :, POLY_PROMPT:])
            layer.attend(q)

        step()
        r, Dv = layer.state.S1.shape[-2:]
        read_rate = read_gbps(read_bytes, repeats=1, min_run_time=0.05)
        for round_ in range(rounds):
            seconds, before, after = between_mm(lambda: measure(step, repeats=1, min_run_time=0.1).median, mm_sizes)
            out.append(dict(round=round_, step_ms=seconds * 1e3, features=r, value_dim=Dv,
                            state_bytes=layer.memory_bytes(), mm_gflops_before=before, mm_gflops_after=after,
                            read_gbps_before=read_rate))
            print(f"(d) poly round {round_}: {seconds * 1e3:.3f} ms", flush=True)
    return out


def poly_figures(row: dict) -> dict:
    """(d)'s useful GFLOP/s and its state traffic (GB/s) in one round: per head, S1 += f1 v1ᵀ and S2 += f2 v2ᵀ
    (2 r d multiply-adds) and the readout Σ_m u_m S1_m ⊙ S2_m (r d products, r d multiply-adds): 7 r d flops; S1
    and S2 (r x d each) read and written once."""
    r, Dv, seconds = row["features"], row["value_dim"], row["step_ms"] / 1e3
    flops = 7 * r * Dv * H * B
    traffic = 2 * 2 * r * Dv * H * B * 4
    return dict(gflops=flops / seconds / 1e9, share=flops / seconds / 1e9 / ((row["mm_gflops_before"] +
                                                                             row["mm_gflops_after"]) / 2),
                gbps=traffic / seconds / 1e9, traffic_mb=traffic / 1e6)


def bench_two(i: int, timing: dict, budget: int):
    """(c): the two-matrix layer holding i - 1 tokens' pairs in buffers sized for i tokens; a step appends
    token i (its 2i - 1 new pair rows) and attends. Crop-then-append keeps the step at context i without
    doubling the buffers on the first step."""
    k, v, q = streams(i)
    layer = TwoCacheLayer(CONSTANTS, max_memory_bytes=budget)
    with torch.no_grad():
        layer.update(k[:, :, :i], v[:, :, :i])
        layer.attend(q)  # forms all i^2 rows, buffers of exactly i^2 rows
        layer.crop(-1)

        def step():
            layer.update(k[:, :, i - 1 : i], v[:, :, i - 1 : i])
            layer.attend(q)
            layer.crop(-1)

        timed = measure(step, **timing)
    layer.update(k[:, :, i - 1 : i], v[:, :, i - 1 : i])
    return timed, layer.memory_bytes()


def fit_slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default: docs/bench_cache/ for a full run)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default 2; 1 with --quick, which a busy machine slows least)")
    parser.add_argument("--max-four", type=int, default=DEFAULT_MAX_FOUR,
                        help="largest i for (a); (b) stops at min(this, 2048)")
    parser.add_argument("--two-budget", type=int, default=None,
                        help="max_memory_bytes for (c); default min(RAM/4, 6 GiB)")
    parser.add_argument("--fit-from", type=int, default=256, help="fit the exponents on i >= this")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved (torch.mm, step, torch.mm) rounds for (a)'s GEMM share (default 9; 2 with "
                             "--quick)")
    parser.add_argument("--quick", action="store_true", help="i up to 64, short timings (a smoke run)")
    parser.add_argument("--wait-idle", type=float, default=0.0,
                        help="shared machine: wait up to this many seconds for idle cores before each i, and retry "
                             "disturbed timings as long")
    parser.add_argument("--from-csv", action="store_true", help="measure nothing: rebuild tables.md from --out's files")
    args = parser.parse_args(argv)
    full = args.from_csv or (not args.quick and args.max_four == DEFAULT_MAX_FOUR and args.two_budget is None)
    args.threads = args.threads or (1 if args.quick else 2)
    args.rounds = (2 if args.quick else 9) if args.rounds is None else args.rounds
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    args.out = output_dir(parser, args.out, NAME, full)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if (rows := rebuild_or_start(args, NAME, render)) is not None:
        return rows
    if args.quick:
        sizes_four, max_b, fit_from, top = [16, 32, 64], 64, 16, 6
        timing, mm_sizes, read_bytes = dict(repeats=1, min_run_time=0.02), (256,), 64 << 20
    else:
        sizes_four = [2**p for p in range(6, 13) if 2**p <= args.max_four]
        max_b, fit_from, top = min(args.max_four, 2048), args.fit_from, 12
        timing, mm_sizes, read_bytes = dict(repeats=3, min_run_time=0.2, wait_idle=args.wait_idle), (1024,), 1 << 30
    # (c) tries i up to 2^top, in steps of sqrt(2), until the guard refuses.
    sizes_two = sorted({int(round(2 ** (p / 2))) for p in range(2 * int(math.log2(sizes_four[0])), 2 * top + 1)})
    budget = args.two_budget or min(default_memory_budget(torch.device("cpu")), 6 << 30)

    load_before = load_snapshot()
    rows, mm_rates = [], []
    stopped = None
    for i in sorted(set(sizes_four) | set(sizes_two)):
        wait_for_idle(args.wait_idle)
        mm_rates.append(mm_gflops(mm_sizes, repeats=1, min_run_time=timing["min_run_time"]))
        flops = 4 * i * i * D * H * B
        todo = []
        if i in sizes_four:
            todo.append(("a", lambda: bench_four(i, timing, explicit=False)))
            if i <= max_b:
                todo.append(("b", lambda: bench_four(i, timing, explicit=True)))
        if i in sizes_two and stopped is None:
            todo.append(("c", lambda: bench_two(i, timing, budget)))
        for method, run in todo:
            if i >= 512:
                wait_for_idle(args.wait_idle)
            read_rate = read_gbps(read_bytes, repeats=1, min_run_time=0.05) if method == "c" else None
            try:
                timed, held = run()
            except TwoCacheMemoryError as e:
                stopped = (i, str(e))
                print(f"(c) stops at i={i}: {e}")
                continue
            scratch = decode_scratch_elements(B, H, i, i, D) * 4 if method == "a" else 0
            rows.append(dict(method=method, i=i, step_ms_best=timed.best * 1e3, step_ms_median=timed.median * 1e3,
                             gflops_best=flops / timed.best / 1e9, cache_bytes=held, scratch_bytes=scratch,
                             mm_gflops_before=mm_rates[-1], read_gbps_before=read_rate, disturbed=timed.disturbed))
            print(f"{method} i={i:5d}  {timed.best * 1e3:9.2f} ms (median {timed.median * 1e3:9.2f})  "
                  f"{flops / timed.best / 1e9:7.1f} GFLOP/s  cache {held / 2**20:10.2f} MiB", flush=True)
        gc.collect()  # a two_cache layer and its memory budget refer to each other: free its GiBs before the next i
    shares = []
    for i in [i for i in (1024, 4096) if i in sizes_four] or sizes_four[-1:]:
        wait_for_idle(args.wait_idle)
        shares += share_rounds(i, args.rounds, mm_sizes)
    wait_for_idle(args.wait_idle)
    poly = poly_rounds(args.rounds, mm_sizes, read_bytes)
    load_after = load_snapshot()

    record = machine()
    write_csv(args.out / f"{NAME}.csv", rows, record)
    write_csv(args.out / "shares.csv", shares, record)
    write_csv(args.out / "poly.csv", poly, record)
    write_run_record(args.out, run_record(
        MODULE, argv, TITLE, record, describe_load(load_before, load_after), mm_sizes=list(mm_sizes),
        fit_from=fit_from, two_budget_bytes=budget, two_stopped_at=stopped[0] if stopped else None))
    by, slopes = by_method(rows, fit_from)
    plot(by, slopes, args.out / f"{NAME}.png", fit_from)
    print(publish(args.out, render))
    print(f"wrote {args.out}/{NAME}.csv, shares.csv, poly.csv, run.json, {NAME}.png, tables.md")
    return rows


def by_method(rows: list[dict], fit_from: int):
    """Rows per method, and each method's fitted (time, memory) exponents on i >= fit_from."""
    by = {m: [r for r in rows if r["method"] == m] for m in METHODS}
    slopes = {}
    for m, rs in by.items():
        fit = [r for r in rs if r["i"] >= fit_from]
        if len(fit) >= 2:
            slopes[m] = (fit_slope([r["i"] for r in fit], [r["step_ms_best"] for r in fit]),
                         fit_slope([r["i"] for r in fit], [r["cache_bytes"] for r in fit]))
    return by, slopes


def render(folder: Path) -> str:
    """tables.md from run.json and bench_cache.csv alone."""
    record = read_run_record(folder)
    rows = read_csv(Path(folder) / f"{NAME}.csv")
    for row in rows:
        row["disturbed"] = row["disturbed"] in (True, "True")  # the CSV holds the bool as text
    by, slopes = by_method(rows, record["fit_from"])
    # Every context length's rows carry the torch.mm rate measured before it.
    mm_rates = list({r["i"]: r["mm_gflops_before"] for r in rows}.values())
    stopped = record["two_stopped_at"]
    shares_csv = Path(folder) / "shares.csv"  # absent from pages written before the interleaved rounds
    shares = read_csv(shares_csv) if shares_csv.exists() else []
    poly_csv = Path(folder) / "poly.csv"  # absent from pages written before (d)
    poly = read_csv(poly_csv) if poly_csv.exists() else []
    return render_document(record, tables(by, slopes, mm_rates, tuple(record["mm_sizes"]), record["fit_from"],
                                          stopped, record["two_budget_bytes"], shares, poly))


def share_medians(shares: list[dict]) -> dict[int, tuple[float, float, float, int]]:
    """Per i of the interleaved rounds: (median, lowest, highest share, rounds)."""
    by_i: dict[int, list[float]] = {}
    for r in shares:
        by_i.setdefault(r["i"], []).append(r["share"])
    return {i: (statistics.median(v), min(v), max(v), len(v)) for i, v in by_i.items()}


def tables(by, slopes, mm_rates, mm_sizes, fit_from, stopped, budget, shares, poly) -> list[tuple[str, list[str]]]:
    mm_lines = markdown_table(
        ["fp32 torch.mm GFLOP/s", "measured", "sizes"],
        [[f"{min(mm_rates):.0f}", "before each i (the reference of that i's GEMM share): lowest", mm_sizes],
         [f"{max(mm_rates):.0f}", "before each i: highest", mm_sizes]], "rll")

    by_i: dict[int, dict] = {}
    for m, rs in by.items():
        for r in rs:
            by_i.setdefault(r["i"], {})[m] = r

    def cell(d, m, key, spec, scale=1.0):
        return format(d[m][key] * scale, spec) if m in d else "—"

    step_rows = [[i, f"{next(iter(d.values()))['mm_gflops_before']:.0f}", cell(d, "a", "step_ms_best", ".2f"), cell(d, "a", "step_ms_median", ".2f"),
                  cell(d, "a", "gflops_best", ".0f"), cell(d, "b", "step_ms_best", ".2f"),
                  cell(d, "c", "step_ms_best", ".2f"), cell(d, "a", "cache_bytes", ".2f", 2**-20),
                  cell(d, "a", "scratch_bytes", ".2f", 2**-20), cell(d, "c", "cache_bytes", ".2f", 2**-20),
                  " ".join(m for m in d if d[m]["disturbed"]) or "—"]
                 for i, d in sorted(by_i.items())]
    step_lines = markdown_table(
        ["i", "torch.mm GFLOP/s", "(a) four, factorized ms", "(a) median ms", "(a) GFLOP/s", "(b) four, explicit K1⊘K2 ms",
         "(c) two_cache ms", "four_cache MiB", "(a) scratch MiB (torch ops)", "two_cache MiB", "disturbed"],
        step_rows, "r" * 10 + "l")
    guard = (f"at i = {stopped}: the memory guard (budget {budget / 2**30:.2f} GiB) refused its next growth"
             if stopped else "no")
    step_lines += ["", "Times are the best block of steps; the median block is in the CSV (and for (a) above). "
                   "`disturbed`: every timing of that method overlapped other processes' work. "
                   f"(c) stopped: {guard}."]

    slope_lines = markdown_table(["method", "time x", "memory y"],
                                 [[f"({m}) {METHODS[m]}", f"{st:.2f}", f"{sm:.2f}"] for m, (st, sm) in slopes.items()],
                                 "lrr")

    ratio_rows = []
    interleaved = share_medians(shares)
    share_is = [i for i in (1024, 4096) if any(r["i"] == i for r in by["a"])] or [r["i"] for r in by["a"][-1:]]
    for i_share in share_is:
        a = next(r for r in by["a"] if r["i"] == i_share)
        median_rate = 4 * i_share**2 * D * H * B / (a["step_ms_median"] / 1e3) / 1e9
        mm_rate = a["mm_gflops_before"]
        ratio_rows += [[f"(a) GEMM share at i = {i_share}: best block against torch.mm before it ({mm_rate:.0f} "
                        "GFLOP/s)", f"{a['gflops_best'] / mm_rate:.0%}"],
                       [f"(a) GEMM share at i = {i_share}: median block against the same", f"{median_rate / mm_rate:.0%}"]]
        if i_share in interleaved:
            median, low, high, n = interleaved[i_share]
            ratio_rows.append([f"(a) GEMM share at i = {i_share}: median of {n} interleaved rounds (torch.mm, step, "
                               f"torch.mm; lowest {low:.0%}, highest {high:.0%})", f"**{median:.0%}**"])
    common = sorted(set.intersection(*({r["i"] for r in by[m]} for m in METHODS)))
    if common:
        i = common[-1]
        t = {m: next(r["step_ms_best"] for r in by[m] if r["i"] == i) for m in METHODS}
        streamed = 2 * i * i * H * D * 4  # bytes of K̃ and Ṽ one two_cache step reads
        ratio_rows += [[f"(b) / (c) step time at i = {i} (above 1: two_cache faster than explicit Kronecker)",
                        f"{t['b'] / t['c']:.2f}"],
                       [f"(c) / (a) step time at i = {i} (above 1: two_cache slower than factorized)",
                        f"{t['c'] / t['a']:.2f}"],
                       [f"(c) pair rows read per step at i = {i}, GB", f"{streamed / 1e9:.2f}"],
                       ["(c) rate of reading them, GB/s", f"{streamed / (t['c'] / 1e3) / 1e9:.1f}"]]
        read_rate = next(r.get("read_gbps_before") for r in by["c"] if r["i"] == i)
        if read_rate not in ("", None):  # not in pages written before this column
            ratio_rows += [[f"(c) that rate against this machine's streaming read rate just before it "
                            f"(torch.sum over a large tensor, {read_rate:.1f} GB/s)",
                            f"{streamed / (t['c'] / 1e3) / 1e9 / read_rate:.0%}"]]
    if poly:
        figures = [poly_figures(row) for row in poly]
        share = statistics.median(f["share"] for f in figures)
        first = poly[0]
        read_rate = first["read_gbps_before"]
        ratio_rows += [
            [f"(d) poly step (degree {POLY_DEGREE}, r = {first['features']:,} features per head, state "
             f"{first['state_bytes'] / 2**20:.2f} MiB): median of {len(poly)} interleaved rounds (torch.mm, step, "
             "torch.mm), ms", f"{statistics.median(r['step_ms'] for r in poly):.3f}"],
            [f"(d) its useful flops (7 r d per head) against torch.mm, median of the rounds (lowest "
             f"{min(f['share'] for f in figures):.0%}, highest {max(f['share'] for f in figures):.0%})",
             f"**{share:.0%}**"],
            ["(d) S1 and S2 read and written per step, MB", f"{figures[0]['traffic_mb']:.2f}"],
            [f"(d) rate of that traffic, median of the rounds, against the streaming read rate before them "
             f"({read_rate:.1f} GB/s)", f"{statistics.median(f['gbps'] for f in figures) / read_rate:.0%}"],
        ]
    return [
        ("torch.mm reference", mm_lines),
        (f"One decode step at context length i (B = {B}, H = {H}, d = {D}, fp32)", step_lines),
        (f"Fitted exponents (log-log least squares on i >= {fit_from}): time ∝ i^x, memory ∝ i^y", slope_lines),
        ("Ratios measured in this run", markdown_table(["quantity", "value"], ratio_rows, "lr")),
        ("What the numbers say (computed from the tables above)", findings(by, slopes, mm_rates, by_i)),
    ]


def findings(by, slopes, mm_rates, by_i) -> list[str]:
    """The sentences with figures that docs/bench_cache.md interprets; each is skipped when its rows are absent."""
    lines = []
    if slopes:
        lines.append("- Fitted time exponents: " + ", ".join(f"({m}) {st:.2f}" for m, (st, _) in slopes.items())
                     + "; memory exponents: " + ", ".join(f"({m}) {sm:.2f}" for m, (_, sm) in slopes.items()) + ".")
    both = [i for i, d in sorted(by_i.items()) if "a" in d and "c" in d]
    if both:
        i = both[-1]
        lines.append(f"- At i = {i} four_cache holds {by_i[i]['a']['cache_bytes'] / 2**20:.2f} MiB and two_cache "
                     f"{by_i[i]['c']['cache_bytes'] / 2**20:.2f} MiB.")
    late = [r for r in by["a"] if r["i"] >= 1024]
    if late:
        lines.append(f"- (a)'s scratch from i = {late[0]['i']} to {late[-1]['i']}: "
                     f"{min(r['scratch_bytes'] for r in late) / 2**20:.2f} to "
                     f"{max(r['scratch_bytes'] for r in late) / 2**20:.2f} MiB, while its cache grows from "
                     f"{late[0]['cache_bytes'] / 2**20:.2f} to {late[-1]['cache_bytes'] / 2**20:.2f} MiB.")
    lines.append(f"- The torch.mm rate moved between {min(mm_rates):.0f} and {max(mm_rates):.0f} GFLOP/s during the run.")
    disturbed = [f"({m}) at i = {r['i']}" for m, rs in by.items() for r in rs if r["disturbed"]]
    lines.append(f"- Disturbed timings: {', '.join(disturbed) if disturbed else 'none'}.")
    return lines


def plot(by, slopes, path, fit_from) -> None:
    plt = pyplot()
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
    ax_t.set(xlabel="context length i", ylabel="decode step (ms, best block)", title="decode time per step")
    ax_m.set(xlabel="context length i", ylabel="MiB", title=f"cache memory held (B={B}, H={H}, d={D}, fp32)")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"tensor-attention KV-cache layouts (slopes fitted on i >= {fit_from})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
