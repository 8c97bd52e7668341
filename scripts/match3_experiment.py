#!/usr/bin/env python
"""Match3: one tensor-attention layer vs one standard-attention layer of the same width and heads, several seeds.

    python scripts/match3_experiment.py [--seeds 0 1 2] [--out docs] [--max_steps=300 ...]

Trains `configs/match3-tensor.json` and `configs/match3-standard.json` once per seed (the seed sets the model
initialisation, the data order and the training sequences), evaluates every final model on one common held-out
test set drawn from a seed no run trains on, and writes:

- OUT/match3_curves.csv   model, seed, step, train_loss, eval_loss, eval_accuracy (periodic held-out evaluation)
- OUT/match3_summary.csv  model, seed, parameters, steps, train_seconds, test_accuracy
- OUT/match3_curves.png   held-out accuracy and training loss against steps
and prints a markdown table of the results.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hf_tensor_attn.arguments import DataArguments, parse_args
from hf_tensor_attn.data import Match3Task, answer_accuracy
from hf_tensor_attn.training import train

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"tensor": ROOT / "configs" / "match3-tensor.json", "standard": ROOT / "configs" / "match3-standard.json"}
TEST_SEED = 987_654_321  # far from every training seed and from the per-run eval seeds (task_seed + 1_000_003)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the CSVs and the PNG go")
    parser.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "match3-experiment",
                        help="per-run output_dir parent (models, trainer_state.json)")
    parser.add_argument("--test_examples", type=int, default=4000)
    # One thread: on the shared 2-core machine this was written on, a tensor-attention training step took 0.12 s
    # with one torch thread and 1.7 s with two (the cores were also busy with other work).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    # Anything else is a run-config override applied to every run, e.g. --max_steps=300 (checked by parse_args).
    args, overrides = parser.parse_known_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    curve_rows, summary = [], []
    started = time.perf_counter()
    for model in args.models:
        for seed in args.seeds:
            out_dir = args.work_dir / f"{model}-seed{seed}"
            shutil.rmtree(out_dir, ignore_errors=True)
            run_overrides = [f"--seed={seed}", f"--task_seed={seed}", f"--output_dir={out_dir}", "--save_strategy=no",
                             "--disable_tqdm=true", *overrides]
            model_args, data_args, training_args = parse_args([MODELS[model], *run_overrides])
            t0 = time.perf_counter()
            trainer = train(model_args, data_args, training_args)
            seconds = time.perf_counter() - t0
            accuracy = test_accuracy(trainer.model, data_args, args.test_examples)
            params = sum(p.numel() for p in trainer.model.parameters())
            runtime = next(h["train_runtime"] for h in trainer.state.log_history if "train_runtime" in h)
            summary.append({"model": model, "seed": seed, "parameters": params, "steps": trainer.state.global_step,
                            "train_seconds": round(runtime, 1), "run_seconds": round(seconds, 1),
                            "test_accuracy": round(accuracy, 4)})
            curve_rows += [{"model": model, "seed": seed, **row} for row in curves(trainer.state.log_history)]
            print(json.dumps(summary[-1]), flush=True)

    with open(args.out / "match3_curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["model", "seed", "step", "train_loss", "eval_loss", "eval_accuracy"])
        writer.writeheader()
        writer.writerows(curve_rows)
    with open(args.out / "match3_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    plot(curve_rows, args.out / "match3_curves.png")

    stats = test_set_stats(data_args, args.test_examples)
    print(f"\nMatch3 M={data_args.modulus}, N={data_args.length}; test set: {args.test_examples} sequences, "
          f"positive rate {stats['positive_rate']:.3f}, best guess from position alone {stats['position_only_accuracy']:.3f}")
    print(f"total wall time {time.perf_counter() - started:.0f} s, torch threads {torch.get_num_threads()}\n")
    print("| model | parameters | steps | seed | test accuracy | train time (s) |")
    print("|---|---|---|---|---|---|")
    for row in summary:
        print(f"| {row['model']} | {row['parameters']:,} | {row['steps']} | {row['seed']} | {row['test_accuracy']:.4f} | "
              f"{row['train_seconds']} |")
    for model in args.models:
        accs = [r["test_accuracy"] for r in summary if r["model"] == model]
        print(f"| {model} mean ± std | | | | {np.mean(accs):.4f} ± {np.std(accs):.4f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
