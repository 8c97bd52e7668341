"""Decode throughput of `generate()` against context length: every cache layout beside a Llama of the same size.

Models of one size (hidden 256, 4 layers, 4 heads of 64, random weights: throughput does not depend on them):

    llama               transformers' Llama, its default cache
    hybrid four_cache   [tensor, full] x 2, the default layout
    tensor <layout>     every layer tensor attention: four_cache, two_cache, subgen4 (default options), poly (the
                        polynomial state, degree 2: approximate for an exact-trained layer, constant cost per token)

Where a step's time goes: at context 16, batch 1, each method's decode step under torch.profiler -- torch ops per
generated token, host reads (a tensor's value read by Python) and allocations, counted as a call of `--new` tokens
minus a call of two over the `--new` - 2 steps between, and the shares of the op time in GEMMs, in the attention
kernel and in everything else (profile.csv).

Each generates `--new` greedy tokens after a prompt of each context length, batch 1 and 8. A logits processor stamps
every step (as in bench_compiled_decode), so a call's rate is (new - 1) tokens over the time from the first step's
logits to the last's, the prompt's forward left out; after one untimed call each, `--runs` rounds of one timed call
per method (interleaved, so that the machine's drift moves every method alike), the table gives the median. Memory: the cache's bytes per sequence after the call. A prefill with exact tensor layers costs O(n^3): those
layouts run while batch x n^3 stays within `--max-cubic`^3; two_cache's pair rows are O(n^2) per layer and run while
batch x n^2 stays within `--max-pairs`^2 (its memory guard would stop it past that); the poly state's prefill is
O(n r d) with r = C(66, 2) = 2,145 features here, and runs while batch x n stays within `--max-features`.

    python -m scripts.bench.bench_decode                      # writes docs/bench_decode/
    python -m scripts.bench.bench_decode --quick --out /tmp/d # smoke run
    python -m scripts.bench.bench_decode --from-csv           # rebuild docs/bench_decode/tables.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `scripts.bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from hf_tensor_attn.cache.base import layer_memory_bytes
from scripts.bench.bench_compiled_decode import StepClock
from scripts.bench.harness import (
    ahead_from, describe_load, load_snapshot, machine, markdown_table, output_dir, publish, pyplot, read_csv,
    read_run_record, rebuild_or_start, render_document, run_record, wait_for_idle, write_csv, write_run_record,
)

NAME = "bench_decode"
MODULE = "scripts.bench.bench_decode"
TITLE = "generate() decode throughput against context length: cache layouts and Llama"
SIZE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, vocab_size=259,
            max_position_embeddings=16384)
METHODS = {  # name: (model, cache_implementation, its prefill's cost: "linear" | "features" | "cubic" | "pairs")
    "llama": ("llama", "dynamic", "linear"),
    "hybrid four_cache": ("hybrid", "four_cache", "cubic"),
    "tensor four_cache": ("tensor", "four_cache", "cubic"),
    "tensor two_cache": ("tensor", "two_cache", "pairs"),
    "tensor subgen4": ("tensor", "subgen4", "cubic"),
    "tensor poly": ("tensor", "poly", "features"),
}


def models():
    torch.manual_seed(0)
    built = {"llama": LlamaForCausalLM(LlamaConfig(**SIZE)).eval()}
    for name, types in (("hybrid", ["tensor_attention", "full_attention"] * 2), ("tensor", ["tensor_attention"] * 4)):
        built[name] = AutoModelForCausalLM.from_config(AutoConfig.for_model("tensor_attn", layer_types=types,
                                                                             **SIZE)).eval()
    return built


def runs_at(cost: str, batch: int, n: int, args) -> bool:
    """Whether a layout whose prefill costs `cost` is run at this batch and context."""
    if cost == "cubic":
        return batch * n**3 <= args.max_cubic**3
    if cost == "pairs":
        return batch * n**2 <= args.max_pairs**2
    if cost == "features":
        return batch * n <= args.max_features
    return True


def timed_generate(model, layout: str, prompt: torch.Tensor, new: int):
    """(decode tokens per second, cache bytes per sequence) of one greedy generate call."""
    clock = StepClock()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, cache_implementation=layout, pad_token_id=0, return_dict_in_generate=True,
                         logits_processor=LogitsProcessorList([clock]))
    memory = sum(layer_memory_bytes(layer) for layer in out.past_key_values.layers)
    return (len(clock.stamps) - 1) / (clock.stamps[-1] - clock.stamps[0]), memory // prompt.shape[0]


PROFILE_CONTEXT = 16
GEMMS = {"aten::linear", "aten::mm", "aten::addmm", "aten::matmul", "aten::bmm", "aten::einsum"}
ATTENTION_KERNELS = {"aten::scaled_dot_product_attention", "hf_tensor_attn_cpu::decode_step", "hf_tensor_attn_cpu::poly_step",
                     "hf_tensor_attn::attention_forward"}
HOST_READS = {"aten::item", "aten::is_nonzero", "aten::_local_scalar_dense"}
ALLOCATIONS = {"aten::empty", "aten::empty_strided"}


def profile_counts(model, layout: str, prompt: torch.Tensor, new: int) -> dict:
    """torch.profiler totals of one generate call: top-level ops, host reads and allocations (any depth), and the
    op time (microseconds) of the top-level GEMMs, attention kernels and the rest."""
    with torch.profiler.profile() as prof:
        timed_generate(model, layout, prompt, new)
    events = prof.events()
    top = [e for e in events if e.cpu_parent is None]
    gemm = sum(e.cpu_time_total for e in top if e.name in GEMMS)
    kernel = sum(e.cpu_time_total for e in top if e.name in ATTENTION_KERNELS)
    return dict(ops=len(top), host_reads=sum(e.name in HOST_READS for e in top),
                allocations=sum(e.name in ALLOCATIONS for e in events), gemm_us=gemm, attention_us=kernel,
                other_us=sum(e.cpu_time_total for e in top) - gemm - kernel)


def step_profile(built, new: int) -> list[dict]:
    """Per decode step at context PROFILE_CONTEXT, batch 1: a call of `new` tokens minus a call of two (the prompt's
    forward and one step; a call's rate needs two steps)."""
    prompt = torch.randint(3, 259, (1, PROFILE_CONTEXT), generator=torch.Generator().manual_seed(0))
    rows = []
    for method, (which, layout, _) in METHODS.items():
        with torch.no_grad():
            timed_generate(built[which], layout, prompt, new)  # warms up
            two, full = (profile_counts(built[which], layout, prompt, n) for n in (2, new))
        counts = {key: (full[key] - two[key]) / (new - 2) for key in ("ops", "host_reads", "allocations")}
        total = sum(full[key] for key in ("gemm_us", "attention_us", "other_us"))  # shares: of the longer call
        rows.append(dict(method=method, context=PROFILE_CONTEXT, steps=new - 2, **counts,
                         **{key.replace("_us", "_share"): full[key] / total for key in ("gemm_us", "attention_us",
                                                                                      "other_us")}))
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default: docs/bench_decode/)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--new", type=int, default=16, help="new tokens per generate call")
    parser.add_argument("--runs", type=int, default=3, help="timed generate calls per method, batch and context")
    parser.add_argument("--contexts", type=int, nargs="+", default=[16, 64, 256, 1024, 4096, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-cubic", type=int, default=1024, help="exact tensor prefills while batch x n^3 <= this^3")
    parser.add_argument("--max-pairs", type=int, default=512, help="two_cache while batch x n^2 <= this^2")
    parser.add_argument("--max-features", type=int, default=8192, help="poly while batch x n <= this")
    parser.add_argument("--quick", action="store_true", help="contexts 8 and 32, batch 1 and 2 (smoke run)")
    parser.add_argument("--wait-idle", type=float, default=0.0,
                        help="shared machine: wait up to this many seconds for idle cores before each cell")
    parser.add_argument("--from-csv", action="store_true", help="measure nothing: rebuild tables.md from --out's files")
    args = parser.parse_args(argv)
    defaults = all(getattr(args, k) == parser.get_default(k) for k in ("new", "runs", "contexts", "batches"))
    args.out = output_dir(parser, args.out, NAME, args.from_csv or (not args.quick and defaults))
    if args.quick:
        args.contexts, args.batches, args.new, args.runs = [8, 32], [1, 2], 4, 1
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if (rows := rebuild_or_start(args, NAME, render)) is not None:
        return rows
    built = models()
    load_before, record = load_snapshot(), machine()
    write_csv(args.out / "profile.csv", step_profile(built, args.new), record)
    rows = []
    for batch in args.batches:
        for n in args.contexts:
            prompt = torch.randint(3, 259, (batch, n), generator=torch.Generator().manual_seed(n))
            methods = {m: spec for m, spec in METHODS.items() if runs_at(spec[2], batch, n, args)}
            wait_for_idle(args.wait_idle)
            with torch.no_grad():
                for which, layout, _ in methods.values():
                    timed_generate(built[which], layout, prompt, args.new)  # warms up
                # Rounds over the methods, so that a drift in the machine's speed moves every method alike.
                for run in range(args.runs):
                    for method, (which, layout, _) in methods.items():
                        rate, memory = timed_generate(built[which], layout, prompt, args.new)
                        rows.append(dict(method=method, batch=batch, context=n, new_tokens=args.new, run=run,
                                         tokens_per_s=rate * batch, memory_bytes_per_seq=memory))
            for method in methods:
                rates = [r["tokens_per_s"] for r in rows if (r["method"], r["batch"], r["context"]) == (method, batch, n)]
                print(f"{method:18s} batch {batch} context {n:5d}: {statistics.median(rates):8.1f} tokens/s",
                      flush=True)
            write_csv(args.out / f"{NAME}.csv", rows, record)  # what is measured so far survives a stop

    write_run_record(args.out, run_record(MODULE, argv, TITLE, record, describe_load(load_before, load_snapshot()),
                                          model=SIZE, runs=args.runs, max_cubic=args.max_cubic,
                                          max_pairs=args.max_pairs, max_features=args.max_features))
    plot(args.out)
    print(publish(args.out, render))
    return rows


def medians(rows) -> dict:
    """{(method, batch, context): (median tokens/s, memory bytes per sequence)}."""
    cells = {}
    for r in rows:
        cells.setdefault((r["method"], r["batch"], r["context"]), []).append(r)
    return {key: (statistics.median(r["tokens_per_s"] for r in rs), rs[0]["memory_bytes_per_seq"])
            for key, rs in cells.items()}


def ratio_line(cell, method: str, batch: int, contexts, reference: str = "llama") -> str:
    pairs = [(n, cell[method, batch, n][0] / cell[reference, batch, n][0]) for n in contexts
             if (method, batch, n) in cell and (reference, batch, n) in cell]
    if not pairs:
        return f"- {method} against {reference}, batch {batch}: no context measured for both"
    text = ", ".join(f"{r:.2f}x at {n}" for n, r in pairs)
    return f"- {method} against {reference}, batch {batch}: {text}"


def crossover_line(cell, fast: str, slow: str, batch: int, contexts) -> str:
    both = [n for n in contexts if (fast, batch, n) in cell and (slow, batch, n) in cell]
    since = ahead_from((n, cell[fast, batch, n][0] >= cell[slow, batch, n][0]) for n in both)
    if not both:
        return f"- {fast} against {slow}, batch {batch}: no context measured for both"
    where = "at no measured context" if since is None else f"from context {since} on"
    return f"- {fast} faster than {slow}, batch {batch}: {where} (measured {both[0]}..{both[-1]})"


def render(folder: Path) -> str:
    record = read_run_record(folder)
    rows = read_csv(Path(folder) / f"{NAME}.csv")
    cell = medians(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    contexts = sorted({r["context"] for r in rows})
    sections = []
    for batch in sorted({r["batch"] for r in rows}):
        table = [[m] + [f"{cell[m, batch, n][0]:.1f}" if (m, batch, n) in cell else "–" for n in contexts]
                 for m in methods]
        memory = [[m] + [f"{cell[m, batch, n][1] / 2**20:.2f}" if (m, batch, n) in cell else "–" for n in contexts]
                  for m in methods]
        lines = [ratio_line(cell, m, batch, contexts) for m in methods if m != "llama"]
        lines += [crossover_line(cell, "tensor poly", "tensor four_cache", batch, contexts),
                  crossover_line(cell, "tensor two_cache", "tensor four_cache", batch, contexts)]
        sections += [
            (f"Batch {batch}: decode tokens per second (all sequences; median of {record['runs']} calls, "
             f"{rows[0]['new_tokens']} new tokens), by context length",
             markdown_table(["method"] + [str(n) for n in contexts], table, "l" + "r" * len(contexts))),
            (f"Batch {batch}: cache memory per sequence after the call (MiB)",
             markdown_table(["method"] + [str(n) for n in contexts], memory, "l" + "r" * len(contexts))),
            (f"Batch {batch}: against Llama, and the crossovers (read from the table)", lines),
        ]
    if not (Path(folder) / "profile.csv").is_file():  # a run from before the profile was measured
        return render_document(record, sections)
    profile = read_csv(Path(folder) / "profile.csv")
    table = [[r["method"], f"{r['ops']:.0f}", f"{r['host_reads']:.1f}", f"{r['allocations']:.0f}",
              f"{r['gemm_share']:.0%}", f"{r['attention_share']:.0%}", f"{r['other_share']:.0%}"] for r in profile]
    sections.insert(0, (
        f"Where a decode step goes: context {profile[0]['context']}, batch 1, torch.profiler (counts per step, the "
        f"mean of {profile[0]['steps']:.0f}; shares of the op time of the whole call)",
        markdown_table(["method", "torch ops", "host reads", "allocations", "GEMMs", "attention kernel", "other ops"],
                       table, "lrrrrrr")))
    return render_document(record, sections)


def plot(folder: Path) -> None:
    plt = pyplot()
    rows = read_csv(folder / f"{NAME}.csv")
    cell = medians(rows)
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((n, v[0]) for (m, b, n), v in cell.items() if m == method and b == batch)
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode tokens / s",
               title=f"generate(), batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / f"{NAME}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
