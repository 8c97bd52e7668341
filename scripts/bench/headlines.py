"""The README's "Measured" table: one headline per page, each its page's primary statistic (the median of the main
table, not a best step or a favourable subset), computed here from the page's committed files and naming the CPU it
was measured on. tests/bench/test_readme_headlines.py checks that the README quotes exactly these.

    python -m scripts.bench.headlines      # print each page's headline
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `scripts.bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench.harness import DOCS, ahead_from, read_csv, read_run_record


def cpu(folder: Path) -> str:
    """The CPU of a page's run, as short as tells machines apart: "Xeon (AVX512)", "AMD EPYC (AVX512)"."""
    m = read_run_record(folder)["machine"]
    name = "Xeon" if "Xeon" in m["cpu"] else re.sub(r"\s*\d+-Core Processor", "", m["cpu"]).strip()
    return f"{name} ({m['cpu_capability']})"


def pct(x: float) -> str:
    return f"{x:.0%}"


def bench_attention(folder: Path) -> str:
    rows = read_csv(folder / "bench_attention.csv")
    fwd = [r["fwd_of_mm"] for r in rows]
    both = [r["fwdbwd_of_mm"] for r in rows]
    Ts = sorted({r["T"] for r in rows})
    return (f"tiled op, d = 64, T = {Ts[0]}..{Ts[-1]}, causal and windowed, median of the main table's {len(rows)} "
            f"rows: forward {pct(statistics.median(fwd))} of `torch.mm` ({pct(min(fwd))}-{pct(max(fwd))}), "
            f"forward+backward {pct(statistics.median(both))} ({pct(min(both))}-{pct(max(both))}); {cpu(folder)}")


def bench_cache(folder: Path) -> str:
    from scripts.bench.bench_cache import share_medians

    rows = read_csv(folder / "bench_cache.csv")
    a = next(r for r in rows if r["method"] == "a" and r["i"] == 1024)
    two = next(r for r in rows if r["method"] == "c" and r["i"] == 1024)
    median = share_medians(read_csv(folder / "shares.csv"))[1024][0]
    avx2 = folder / "avx2"  # the same run on the AVX2 build, where published
    beside = f"; AVX2 build {pct(share_medians(read_csv(avx2 / 'shares.csv'))[1024][0])}" if avx2.is_dir() else ""
    return (f"`four_cache` decode step at i = 1024: {pct(median)} of `torch.mm` (interleaved median{beside}), in "
            f"{a['cache_bytes'] / 2**20:.2f} MiB where `two_cache` holds {two['cache_bytes'] / 2**20:.0f} MiB; "
            f"{cpu(folder)}")


def bench_compiled_decode(folder: Path) -> str:
    rows = read_csv(folder / "bench_compiled_decode.csv")
    prompts = sorted({r["prompt"] for r in rows})

    def rate(method, prompt):
        return statistics.median(r["decode_tokens_per_s"] for r in rows if r["method"] == method and r["prompt"] == prompt)

    speedups = [rate("static compiled", p) / rate("static eager", p) for p in prompts]
    return (f'`"static"` + `compile_config`, compiled vs eager, batch 1: median {statistics.median(speedups):.2f}x '
            f"over prompts {' / '.join(map(str, prompts))} ({speedups[0]:.2f}x at {prompts[0]}, {speedups[-1]:.2f}x at "
            f"{prompts[-1]}); {cpu(folder)}")


def bench_decode(folder: Path) -> str:
    from scripts.bench.bench_decode import medians

    cell = medians(read_csv(folder / "bench_decode.csv"))

    def against_llama(method):
        ratios = [v[0] / cell["llama", 1, n][0] for (m, b, n), v in cell.items() if m == method and b == 1]
        return f"{method} {statistics.median(ratios):.2f}x"

    contexts = sorted({n for (m, b, n) in cell if b == 1})
    return (f"`generate()` tokens/s vs a same-size Llama, batch 1, median over contexts {contexts[0]}.."
            f"{contexts[-1]} (where each ran): " + ", ".join(against_llama(m) for m in (
                "hybrid four_cache", "tensor four_cache", "tensor poly")) + f"; {cpu(folder)}")


def eval_subgen(folder: Path) -> str:
    rows = read_csv(folder / "synthetic.csv")
    d = min(r["d"] for r in rows)
    n = max(r["n"] for r in rows if r["method"] == "subgen4/cluster_sum")
    at = [r for r in rows if r["d"] == d and r["n"] == n]
    sub = {r["stream"]: r for r in at if r["method"] == "subgen4/cluster_sum"}
    tokens = [r["rel_error"] for r in at if r["method"].endswith("@cluster_sum") and r["stream"] != "spread"]
    clustered = [r["rel_error"] for s, r in sub.items() if s != "spread"]
    text = (f"synthetic clusterable streams, d = {d}, n = {n}: `subgen4` median relative error "
            f"{statistics.median(clustered):.1e} in {statistics.median(r['memory_bytes'] for s, r in sub.items() if s != 'spread') / 1024:.1f} "
            f"KB per head, exact tokens of the same bytes {statistics.median(tokens):.1e}")
    if "spread" in sub:
        text += f"; keys that never cluster: it keeps them all ({sub['spread']['memory_bytes'] / 1024:.0f} KB)"
    return f"{text}; {cpu(folder)}"


def eval_long_context(folder: Path) -> str:
    from collections import Counter

    from scripts.bench.eval_long_context import at_equal_memory, paired, uses_context

    rows = read_csv(folder / "text.csv")
    parts = []
    for name in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == name]
        w32 = next(r for r in sel if r["method"] == "window" and r["tokens"] == 32)
        d, se = paired(w32, next(r for r in sel if r["method"] == "exact"))
        _, rankable = uses_context(sel)
        winners = Counter(at_equal_memory(sel)[2])
        best = ", ".join(f"{m} {k}" for m, k in winners.most_common())
        subgen = sum(k for m, k in winners.items() if m.startswith("subgen"))
        parts.append(f"{name} model, 32-token window {d:+.3f} ± {se:.3f} nats/byte; "
                     + (f"best at equal memory ({sum(winners.values())} levels): {best} (SubGen {subgen})"
                        if rankable else "it cannot rank caches"))
    return "held-out stdlib source, " + "; ".join(parts) + f"; {cpu(folder)}"


def bench_poly(folder: Path) -> str:
    rows = read_csv(folder / "error.csv")
    n = max(r["n"] for r in rows)
    err = {r["B"]: r["relative_error"] for r in rows if r["n"] == n and r["degree"] == 4 and r["polynomial"] == "taylor"}
    regimes = ", ".join(f"{err[B]:.1e} at B = {B:g}" for B in (1.0, 2.0, 3.0) if B in err)
    runtime = read_csv(folder / "runtime.csv")
    seconds = {(r["method"], r["n"]): r["seconds"] for r in runtime}
    ns = sorted({n for m, n in seconds if m == "exact"})
    since = ahead_from((n, seconds["poly degree 4", n] <= seconds["exact", n]) for n in ns)
    speed = (f"faster than causal exact from n = {since} (measured to {ns[-1]})" if since is not None
             else f"slower than causal exact at every measured n up to {ns[-1]}")
    return (f"Taylor degree 4, n = {n}, entries in [-B, B]: relative error {regimes}; {speed}; {cpu(folder)}")


def match3_experiment(folder: Path) -> str:
    from scripts.bench.match3_experiment import render

    verdict = {k: v for k, v in re.findall(r"^- (tensor ahead|standard ahead|level): (.*)\.$", render(folder), re.M)}
    level = verdict["level"].count("(M=")
    return (f"tuned alike on validation, 3 seeds: tensor ahead at {verdict['tensor ahead']}, standard ahead at "
            f"{verdict['standard ahead']}, level at the other {level} cells; {cpu(folder)}")


# page (docs/<page>.md, folder docs/<page>/) -> its headline
HEADLINES = {
    "bench_attention": bench_attention,
    "bench_cache": bench_cache,
    "bench_compiled_decode": bench_compiled_decode,
    "bench_decode": bench_decode,
    "eval_subgen": eval_subgen,
    "eval_long_context": eval_long_context,
    "bench_poly": bench_poly,
    "match3": match3_experiment,
}


def headline(page: str, docs: Path = DOCS) -> str:
    return HEADLINES[page](docs / page)


if __name__ == "__main__":
    for page in HEADLINES:
        try:
            print(f"{page}: {headline(page)}")
        except FileNotFoundError as e:
            print(f"{page}: no run yet ({e})")
