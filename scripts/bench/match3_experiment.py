#!/usr/bin/env python
"""Match3: one tensor-attention layer vs one standard-attention layer of the same width and heads, several seeds.

    python -m scripts.bench.match3_experiment [--seeds 0 1 2] [--out DIR] [--max_steps=300 ...]
    python -m scripts.bench.match3_experiment --quick --out /tmp/m3     # a smoke run: one seed, a few steps
    python -m scripts.bench.match3_experiment --from-csv                # rebuild tables.md from docs/match3/*.csv

Trains `configs/match3-tensor.json` and `configs/match3-standard.json` once per seed (the seed sets the model
initialisation, the data order and the training sequences), evaluates every final model on one common held-out
test set drawn from a seed no run trains on, and writes to --out (default docs/match3/ for the full study,
runs/bench/match3/ for anything else):

- match3_curves.csv   model, seed, step, train_loss, eval_loss, eval_accuracy (periodic held-out evaluation)
- match3_summary.csv  model, seed, parameters, steps, train_seconds, test_accuracy
- match3_curves.png   held-out accuracy and training loss against steps
- tables.md           per-seed and mean test accuracy, and what the test set itself allows
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `scripts.bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from hf_tensor_attn.arguments import DataArguments
from hf_tensor_attn.arguments import parse_args as parse_run_args  # this script's own parse_args reads its CLI
from hf_tensor_attn.data import Match3Task, answer_accuracy
from hf_tensor_attn.training import train
from scripts.bench.harness import (
    ROOT, describe_load, load_snapshot, machine, markdown_table, output_dir, pyplot, read_csv, write_csv, write_tables,
)

NAME = "match3"
MODELS = {"tensor": ROOT / "configs" / "match3-tensor.json", "standard": ROOT / "configs" / "match3-standard.json"}
TEST_SEED = 987_654_321  # far from every training seed and from the per-run eval seeds (task_seed + 1_000_003)
DEFAULT_SEEDS = [0, 1, 2]
DEFAULT_TEST_EXAMPLES = 4000
# --quick: the experiment's configs on short sequences and a handful of steps, to check the plumbing only.
QUICK_OVERRIDES = ["--max_steps=4", "--length=8", "--num_train_examples=256", "--num_eval_examples=32",
                   "--per_device_train_batch_size=16", "--eval_steps=2", "--logging_steps=1"]
QUICK_TEST_EXAMPLES = 64


def test_set_task(data_args: DataArguments, num_examples: int) -> Match3Task:
    return Match3Task(data_args.modulus, data_args.length, num_examples, TEST_SEED, data_args.positive_rate)


def test_accuracy(model, data_args: DataArguments, num_examples: int, batch_size: int = 500) -> float:
    data = test_set_task(data_args, num_examples).build()
    ids, labels = torch.tensor(data["input_ids"]), torch.tensor(data["labels"])
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            logits = model(input_ids=ids[start : start + batch_size], use_cache=False).logits
            scored = int((labels[start : start + batch_size, 1:] != -100).sum())
            correct += answer_accuracy(logits, labels[start : start + batch_size]) * scored
            total += scored
    return correct / total


def test_set_stats(data_args: DataArguments, num_examples: int) -> dict[str, float]:
    task = test_set_task(data_args, num_examples)
    return task.describe(task.build())


def curves(log_history: list[dict]) -> list[dict]:
    by_step: dict[int, dict] = {}
    for entry in log_history:
        row = by_step.setdefault(entry["step"], {"step": entry["step"]})
        if "loss" in entry:
            row["train_loss"] = entry["loss"]
        if "eval_accuracy" in entry:
            row["eval_loss"] = entry["eval_loss"]
            row["eval_accuracy"] = entry["eval_accuracy"]
    return [by_step[s] for s in sorted(by_step)]


def plot(curve_rows: list[dict], path: Path) -> None:
    plt = pyplot()
    colors = {"tensor": "tab:red", "standard": "tab:blue"}
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for model in MODELS:
        seeds = sorted({r["seed"] for r in curve_rows if r["model"] == model})
        for i, seed in enumerate(seeds):
            rows = [r for r in curve_rows if r["model"] == model and r["seed"] == seed]
            label = f"{model} attention" if i == 0 else None
            evals = [r for r in rows if r.get("eval_accuracy") is not None]
            acc_ax.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], color=colors[model],
                        alpha=0.8, marker=".", label=label)
            losses = [r for r in rows if r.get("train_loss") is not None]
            loss_ax.plot([r["step"] for r in losses], [r["train_loss"] for r in losses], color=colors[model],
                         alpha=0.6, label=label)
    acc_ax.axhline(0.95, color="gray", linestyle=":", linewidth=1)
    acc_ax.set(xlabel="step", ylabel="held-out answer accuracy", title="Match3: held-out accuracy", ylim=(0.6, 1.0))
    loss_ax.set(xlabel="step", ylabel="training loss (answer tokens)", title="Match3: training loss", yscale="log")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_tables(summary: list[dict], data_args: DataArguments, test_examples: int) -> list[tuple[str, list[str]]]:
    stats = test_set_stats(data_args, test_examples)
    seeds = sorted({r["seed"] for r in summary})
    rows = []
    for model in dict.fromkeys(r["model"] for r in summary):
        runs = {r["seed"]: r for r in summary if r["model"] == model}
        accs = [r["test_accuracy"] for r in runs.values()]
        times = [r["train_seconds"] for r in runs.values()]
        first = next(iter(runs.values()))
        rows.append([model, f"{first['parameters']:,}", f"{first['steps']:,}"]
                    + [f"{runs[s]['test_accuracy']:.4f}" if s in runs else "-" for s in seeds]
                    + [f"{np.mean(accs):.3f} ± {np.std(accs):.3f}", f"{min(times):.0f}–{max(times):.0f}"])
    header = ["model", "parameters", "steps", *(f"seed {s}" for s in seeds), "mean ± std", "train seconds per seed"]
    return [
        (f"Test accuracy on answer tokens (M={data_args.modulus}, N={data_args.length}, {test_examples} test sequences)",
         markdown_table(header, rows, "lrr" + "r" * (len(seeds) + 2))),
        ("The test set", markdown_table(
            ["positive answers", "best guess from the position alone"],
            [[f"{stats['positive_rate']:.3f}", f"{stats['position_only_accuracy']:.3f}"]], "rr")),
    ]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {DEFAULT_SEEDS}")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--out", default=None, help="where the CSVs, the PNG and tables.md go")
    parser.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "match3-experiment",
                        help="per-run output_dir parent (models, trainer_state.json)")
    parser.add_argument("--test_examples", type=int, default=None, help=f"default {DEFAULT_TEST_EXAMPLES}")
    parser.add_argument("--quick", action="store_true", help="one seed, a few steps on short sequences (a smoke run)")
    parser.add_argument("--from-csv", action="store_true",
                        help="train nothing: rebuild tables.md from the CSVs already in --out")
    # One thread: on the shared 2-core machine this was written on, two threads were many times slower per step
    # whenever another process held a core (OpenMP waits for the descheduled thread).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    # Anything else is a run-config override applied to every run, e.g. --max_steps=300 (checked by parse_run_args).
    args, overrides = parser.parse_known_args(argv)
    full = args.from_csv or (not args.quick and not overrides and args.seeds in (None, DEFAULT_SEEDS)
                             and args.test_examples in (None, DEFAULT_TEST_EXAMPLES) and args.models == list(MODELS))
    if args.quick:
        overrides = QUICK_OVERRIDES + overrides
        args.seeds = args.seeds or [0]
        args.test_examples = args.test_examples or QUICK_TEST_EXAMPLES
    args.seeds = args.seeds or DEFAULT_SEEDS
    args.test_examples = args.test_examples or DEFAULT_TEST_EXAMPLES
    args.out = output_dir(parser, args.out, NAME, full)
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    data_args = parse_run_args([MODELS[args.models[0]], *overrides])[1]
    if args.from_csv:
        summary = read_csv(args.out / "match3_summary.csv")
        recorded = {key: summary[0][key] for key in machine() if key in summary[0]}
        text = write_tables(args.out / "tables.md", Path(__file__).stem, argv, "Match3: tensor vs standard attention",
                            recorded or None, "not recorded in these CSVs",
                            summary_tables(summary, data_args, args.test_examples),
                            code="that of the run that wrote these CSVs, not recorded in them")
        print(text)
        return 0

    load_before = load_snapshot()
    curve_rows, summary = [], []
    for model in args.models:
        for seed in args.seeds:
            out_dir = args.work_dir / f"{model}-seed{seed}"
            shutil.rmtree(out_dir, ignore_errors=True)
            run_overrides = [f"--seed={seed}", f"--task_seed={seed}", f"--output_dir={out_dir}", "--save_strategy=no",
                             "--disable_tqdm=true", *overrides]
            model_args, data_args, training_args = parse_run_args([MODELS[model], *run_overrides])
            trainer = train(model_args, data_args, training_args)
            accuracy = test_accuracy(trainer.model, data_args, args.test_examples)
            params = sum(p.numel() for p in trainer.model.parameters())
            runtime = next(h["train_runtime"] for h in trainer.state.log_history if "train_runtime" in h)
            summary.append({"model": model, "seed": seed, "parameters": params, "steps": trainer.state.global_step,
                            "train_seconds": round(runtime, 1), "test_accuracy": round(accuracy, 4)})
            curve_rows += [{"model": model, "seed": seed, "step": row["step"],
                            **{key: row.get(key) for key in ("train_loss", "eval_loss", "eval_accuracy")}}
                           for row in curves(trainer.state.log_history)]
            print(json.dumps(summary[-1]), flush=True)
    load_after = load_snapshot()

    record = machine()
    write_csv(args.out / "match3_curves.csv", curve_rows, record)
    write_csv(args.out / "match3_summary.csv", summary, record)
    plot(curve_rows, args.out / "match3_curves.png")
    text = write_tables(args.out / "tables.md", Path(__file__).stem, argv, "Match3: tensor vs standard attention", record,
                        describe_load(load_before, load_after), summary_tables(summary, data_args, args.test_examples))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
