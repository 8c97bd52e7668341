"""Decode throughput of `generate()`, compiled against eager, on this machine.

One small hybrid model ([tensor, full] x 2, hidden 256, 4 heads; random weights: throughput does not depend on them)
and a Llama of the same size generate `--new` greedy tokens after prompts of several lengths, batch 1:

    four_cache eager          the package's default layout, buffers growing with the context
    static eager              static_four_cache, buffers of prompt + new tokens allocated once, not compiled
    static compiled           the same, decode steps compiled by `generate` (CompileConfig(fullgraph=True))
    llama dynamic eager       transformers' Llama with its default cache
    llama static compiled     Llama with `cache_implementation="static"`, compiled the same way

A logits processor stamps the time at every step, so a call's decode rate is (new - 1) tokens over the time from the
first step's logits to the last's, the prompt's forward left out (its time is reported apart, from the call's start
to the first logits). Each method runs one untimed call (which compiles), then `--runs` timed calls; the tables give
the median rate over them and the range. The static layout's compiled step attends over its whole buffer (O(L^2) per
head, L = prompt + new); the eager layouts over the tokens written.

    python -m scripts.bench.bench_compiled_decode --wait-idle 30
    python -m scripts.bench.bench_compiled_decode --quick --out /tmp/smoke
    python -m scripts.bench.bench_compiled_decode --from-csv    # rebuild docs/bench_compiled_decode/tables.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `scripts.bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, CompileConfig, LlamaConfig, LlamaForCausalLM,
                          LogitsProcessor, LogitsProcessorList)

import hf_tensor_attn  # noqa: F401  (registers the Auto classes)
from scripts.bench.harness import (
    describe_load, load_snapshot, machine, markdown_table, output_dir, publish, pyplot, read_csv,
    read_run_record, rebuild_or_start, render_document, run_record, wait_for_idle, write_csv, write_run_record,
)

NAME = "bench_compiled_decode"
MODULE = "scripts.bench.bench_compiled_decode"
TITLE = "generate() decode throughput: compiled static cache against eager layouts and Llama"
SIZE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, vocab_size=259,
            max_position_embeddings=4096)
METHODS = {  # name: (model, cache_implementation, compiled)
    "four_cache eager": ("tensor", "four_cache", False),
    "static eager": ("tensor", "static_four_cache", False),
    "static compiled": ("tensor", "static_four_cache", True),
    "llama dynamic eager": ("llama", "dynamic", False),
    "llama static compiled": ("llama", "static", True),
}


def models():
    torch.manual_seed(0)
    tensor = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "tensor_attn", layer_types=["tensor_attention", "full_attention"] * 2, **SIZE)).eval()
    llama = LlamaForCausalLM(LlamaConfig(**SIZE)).eval()
    return {"tensor": tensor, "llama": llama}


class StepClock(LogitsProcessor):
    """Stamps the time at each generation step (after that step's forward), scores unchanged."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def timed_generate(model, cache_implementation: str, compiled: bool, prompt: torch.Tensor, new: int):
    """(prefill seconds, decode tokens per second) of one greedy generate call."""
    compile_config = None
    if compiled:
        compile_config = CompileConfig(fullgraph=True)
        compile_config._compile_all_devices = True  # generate compiles on GPUs by itself, on a CPU when told to
    clock = StepClock()
    start = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, cache_implementation=cache_implementation, compile_config=compile_config,
                   disable_compile=not compiled, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
    return clock.stamps[0] - start, (len(clock.stamps) - 1) / (clock.stamps[-1] - clock.stamps[0])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default: docs/bench_compiled_decode/)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --quick)")
    parser.add_argument("--new", type=int, default=64, help="new tokens per generate call")
    parser.add_argument("--runs", type=int, default=7, help="timed generate calls per method and prompt")
    parser.add_argument("--quick", action="store_true", help="prompts of 8 and 16 tokens, short timings (smoke run)")
    parser.add_argument("--wait-idle", type=float, default=0.0,
                        help="shared machine: wait up to this many seconds for idle cores, retry disturbed timings")
    parser.add_argument("--from-csv", action="store_true", help="measure nothing: rebuild tables.md from --out's files")
    args = parser.parse_args(argv)
    args.threads = args.threads or (1 if args.quick else 2)
    args.out = output_dir(parser, args.out, NAME, args.from_csv or (not args.quick and args.new == 64))
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if (rows := rebuild_or_start(args, NAME, render)) is not None:
        return rows
    prompts = [8, 16] if args.quick else [16, 128, 512]
    new, runs = (4, 2) if args.quick else (args.new, args.runs)
    built = models()
    load_before = load_snapshot()
    rows = []
    for length in prompts:
        prompt = torch.randint(3, 259, (1, length), generator=torch.Generator().manual_seed(length))
        for method, (which, layout, compiled) in METHODS.items():
            wait_for_idle(args.wait_idle)
            torch._dynamo.reset()
            with torch.no_grad():
                timed_generate(built[which], layout, compiled, prompt, new)  # compiles (static compiled), warms up
                for run in range(runs):
                    prefill, rate = timed_generate(built[which], layout, compiled, prompt, new)
                    rows.append(dict(method=method, prompt=length, new_tokens=new, run=run, prefill_s=prefill,
                                     decode_tokens_per_s=rate))
            rates = [r["decode_tokens_per_s"] for r in rows[-runs:]]
            print(f"{method:22s} prompt {length:4d}: {statistics.median(rates):8.1f} tokens/s "
                  f"({min(rates):.1f} to {max(rates):.1f})", flush=True)
    load_after = load_snapshot()
    record = machine()
    write_csv(args.out / f"{NAME}.csv", rows, record)
    write_run_record(args.out, run_record(MODULE, argv, TITLE, record, describe_load(load_before, load_after),
                                          model=SIZE))
    plot(rows, args.out / f"{NAME}.png")
    print(publish(args.out, render))
    return rows


def render(folder: Path) -> str:
    record = read_run_record(folder)
    rows = read_csv(Path(folder) / f"{NAME}.csv")
    prompts = sorted({r["prompt"] for r in rows})
    runs = {}
    for r in rows:
        runs.setdefault((r["method"], r["prompt"]), []).append(r["decode_tokens_per_s"])
    rate = {key: statistics.median(values) for key, values in runs.items()}
    table = [[m] + [f"{rate[m, p]:.1f} ({min(runs[m, p]):.0f}-{max(runs[m, p]):.0f})" for p in prompts]
             for m in METHODS if (m, prompts[0]) in rate]
    speedups = [rate["static compiled", p] / rate["static eager", p] for p in prompts]
    versus = [rate["static compiled", p] / rate["four_cache eager", p] for p in prompts]
    llama = [rate["static compiled", p] / rate["llama static compiled", p] for p in prompts]
    new = rows[0]["new_tokens"]
    summary = [
        "",
        f"Compiled against eager, the same static layout: median {statistics.median(speedups):.2f}x over the prompt "
        f"lengths ({', '.join(f'{s:.2f}x' for s in speedups)}).",
        "",
        f"Compiled static against the default four_cache, eager: median {statistics.median(versus):.2f}x "
        f"({', '.join(f'{s:.2f}x' for s in versus)}).",
        "",
        f"Compiled static against Llama's compiled static cache: median {statistics.median(llama):.2f}x "
        f"({', '.join(f'{s:.2f}x' for s in llama)}).",
    ]
    return render_document(record, [
        (f"Decode tokens per second, batch 1, {new} new tokens, by prompt length: median over "
         f"{len(runs[next(iter(runs))])} calls (range)",
         markdown_table(["method"] + [f"prompt {p}" for p in prompts], table, "l" + "r" * len(prompts)) + summary),
    ])


def plot(rows, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in METHODS:
        prompts = sorted({r["prompt"] for r in rows if r["method"] == method})
        medians = [statistics.median(r["decode_tokens_per_s"] for r in rows if r["method"] == method
                                     and r["prompt"] == p) for p in prompts]
        ax.plot(prompts, medians, marker="o", label=method)
    ax.set(xscale="log", xlabel="prompt tokens", ylabel="decode tokens / s", title="generate(), batch 1")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
