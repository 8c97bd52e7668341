#!/usr/bin/env python
"""Match3, tensor vs standard attention, tuned alike on a validation split and tested once, over a sweep of M and N.

    python -m scripts.bench.match3_experiment                       # the study, into docs/match3/
    python -m scripts.bench.match3_experiment --resume              # finish an interrupted study (skips done blocks)
    python -m scripts.bench.match3_experiment --quick --out /tmp/m3 # a smoke run: one tiny cell, a few steps
    python -m scripts.bench.match3_experiment --from-csv            # rebuild tables.md from docs/match3/

Protocol, the same for both models ("tensor": one `tensor_attention` layer; "standard": one `full_attention` layer):

1. For each cell (M, N) of the sweep, every point of the grid (width, learning rate) is trained with seed 0 for the
   same number of steps. Each run evaluates on its *validation* split (`match3_splits`: the seed
   `task_seed + EVAL_SEED_OFFSET`) every EVAL_EVERY steps.
2. The grid point with the best final validation accuracy is chosen (ties: the earlier, cheaper point).
3. The chosen point is trained again with seeds 1 and 2 (each seed sets the initialisation, the data order and
   the training sequences); the three chosen models are scored once on a *test* set drawn from TEST_SEED, which no
   run trains or validates on. Nothing is ever chosen by test accuracy; grid points not chosen are not tested.

Parameter counts are matched: the tensor layer's k/v projections are twice as wide (k1|k2, v1|v2, 2 w^2 more
weights), so the standard model's MLP gets round(2w/3) more hidden units. Compute is reported as wall time and as
FLOPs per training step (torch's FlopCounterMode over one forward and backward for the matmuls, plus the attention
core counted from its allowed pairs or triples, which FlopCounterMode does not see on CPU).

Writes to --out (default docs/match3/ for the full study, runs/bench/match3/ otherwise), following the
publishing convention of scripts/bench/harness.py:

- runs.csv       one row per training run: cell, model, grid point, seed, chosen?, parameters, FLOPs per step,
                 train seconds, final validation accuracy, steps to 95% validation accuracy, test accuracy
- curves.csv     cell, model, grid point, seed, step, train_loss, eval_loss, eval_accuracy (validation)
- test_set.csv   each cell's test set: positive rate and the best guess from the position alone
- run.json       command, code, machine, load, and the study's settings
- curves.png     validation accuracy against steps of the chosen configurations, one panel per cell
- tables.md      = render(out): every table and every sentence with a number, from the files above alone
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `scripts.bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from transformers import set_seed

from hf_tensor_attn.arguments import parse_args as parse_run_args  # this script's own parse_args reads its CLI
from hf_tensor_attn.data import Match3Task, answer_accuracy, match3_splits
from hf_tensor_attn.training import build_model, build_tokenizer, make_trainer, run_trainer
from scripts.bench.harness import (
    ROOT, load_snapshot, machine, markdown_table, output_dir, publish, pyplot, read_csv,
    read_run_record, render_document, run_record, write_csv, write_run_record,
)

NAME = "match3"
MODULE = "scripts.bench.match3_experiment"
TITLE = "Match3: tensor vs standard attention, validation-tuned, over M and N"
LAYER_TYPES = {"tensor": "tensor_attention", "standard": "full_attention"}
TEST_SEED = 987_654_321  # far from every training seed and from the validation seeds (task_seed + 1_000_003)
TARGET = 0.95
# When the verdict calls one model ahead: by more than this much accuracy and this many standard deviations.
AHEAD = {"points": 0.01, "stds": 2}
# The study. N is min(M, 12): a tensor-attention step costs about N^2 more at this size, and
# Sanford et al.'s separation is about M (model size must grow with M), so M is the axis that matters.
STUDY = {
    "cells": [[16, 12], [48, 12], [8, 8], [32, 12], [24, 12]],
    # Widths 16 and 32: below and near M for most cells, where Sanford et al.'s bound says standard attention's
    # size must grow with M.
    "grid": [{"hidden_size": 16, "learning_rate": 0.01}, {"hidden_size": 32, "learning_rate": 0.003},
             {"hidden_size": 32, "learning_rate": 0.01}],
    "seeds": [0, 1, 2],
    "steps": 300,
    "batch_size": 32,
    # Two passes over the training sequences: generating them is a Python loop, too slow on a shared machine
    # for one fresh sequence per example.
    "train_examples": 4800,
    "eval_every": 50,
    "validation_examples": 500,
    "test_examples": 2000,
}
QUICK = {**STUDY, "cells": [[8, 6]], "grid": STUDY["grid"][1:], "seeds": [0, 1], "steps": 4, "eval_every": 2,
         "train_examples": 128,
         "validation_examples": 32, "test_examples": 64}
# What both models share (the model fields besides width, and the optimiser).
SHARED = {"num_hidden_layers": 1, "num_attention_heads": 2, "position_embedding_type": "none", "task": "match3",
          "positive_rate": 0.5, "lr_scheduler_type": "cosine", "warmup_steps": 0.05, "weight_decay": 0.0,
          "max_grad_norm": 1.0, "optim": "adamw_torch", "logging_steps": 10, "eval_strategy": "steps",
          "save_strategy": "no", "bf16": False, "dataloader_drop_last": True, "report_to": "none",
          "disable_tqdm": True}


def default_intermediate(width: int) -> int:
    return 8 * ((8 * width // 3 + 7) // 8)  # TensorAttnConfig's default


def run_config(model: str, point: dict, modulus: int, length: int, seed: int, study: dict, out_dir: Path) -> dict:
    width = point["hidden_size"]
    # The standard layer lacks the tensor layer's second k and v projections (2 w^2 weights): its MLP gets them.
    extra = round(2 * width / 3) if model == "standard" else 0
    return {**SHARED, "layer_types": [LAYER_TYPES[model]], "hidden_size": width,
            "intermediate_size": default_intermediate(width) + extra, "learning_rate": point["learning_rate"],
            "modulus": modulus, "length": length, "num_train_examples": study["train_examples"],
            "num_eval_examples": study["validation_examples"], "task_seed": seed, "seed": seed,
            "max_steps": study["steps"], "per_device_train_batch_size": study["batch_size"],
            "eval_steps": study["eval_every"], "output_dir": str(out_dir),
            # Two evaluation batches: dataloader_drop_last would drop a partial one.
            "per_device_eval_batch_size": study["validation_examples"] // 2}


def test_task(modulus: int, length: int, num_examples: int) -> Match3Task:
    return Match3Task(modulus, length, num_examples, TEST_SEED, 0.5)


@functools.lru_cache(maxsize=1)
def test_data(modulus: int, length: int, num_examples: int):
    """A cell's test set, built once for both models (a Python loop: slow on a shared machine)."""
    return test_task(modulus, length, num_examples).build()


def test_accuracy(model, data, batch_size: int = 500) -> float:
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


def flops_per_step(model, batch_size: int, length: int) -> int:
    """FLOPs of one forward and backward on a batch as torch's FlopCounterMode counts them: the matmuls outside the
    attention core (on CPU it counts neither SDPA nor the tensor-attention op; `attention_core_flops` adds those)."""
    ids = torch.full((batch_size, 2 * length + 1), 70)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def attention_core_flops(model: str, width: int, length: int, batch_size: int) -> int:
    """Useful FLOPs of the attention core in one forward and backward (three times the forward), counted as
    bench_attention counts them: 4 d per allowed (query, key) pair for standard attention (scores and values, 2 d
    each) and 4 d per allowed (query, a, b) triple for tensor attention, causal, every head (SHARED's 2 heads)."""
    tokens, heads = 2 * length + 1, SHARED["num_attention_heads"]
    head_dim = width // heads
    allowed = (tokens * (tokens + 1) // 2 if model == "standard"
               else tokens * (tokens + 1) * (2 * tokens + 1) // 6)  # sum over t of (t+1) or (t+1)^2
    return 3 * 4 * head_dim * allowed * heads * batch_size


def validation_curve(log_history: list[dict]) -> list[dict]:
    by_step: dict[int, dict] = {}
    for entry in log_history:
        row = by_step.setdefault(entry["step"], {"step": entry["step"]})
        if "loss" in entry:
            row["train_loss"] = entry["loss"]
        if "eval_accuracy" in entry:
            row["eval_loss"] = entry["eval_loss"]
            row["eval_accuracy"] = entry["eval_accuracy"]
    return [by_step[s] for s in sorted(by_step)]


def steps_to_target(curve: list[dict]) -> int | str:
    reached = [r["step"] for r in curve if r.get("eval_accuracy") is not None and r["eval_accuracy"] >= TARGET]
    return reached[0] if reached else ""


_DATA: dict[tuple, tuple] = {}


def splits(modulus: int, length: int, seed: int, study: dict):
    """Training and validation sets of a cell and seed, built once for all grid points (as `build_datasets` would)."""
    key = (modulus, length, seed, study["train_examples"], study["validation_examples"])
    if key not in _DATA:
        _DATA.clear()  # blocks run cell by cell: only the current cell's sets are worth keeping
        _DATA[key] = match3_splits(modulus, length, 0.5, study["train_examples"], study["validation_examples"], seed)
    return _DATA[key]


def train_one(model: str, point: dict, modulus: int, length: int, seed: int, study: dict, work_dir: Path):
    """`hf_tensor_attn.training.train` for one run, with the cell's datasets reused across grid points."""
    out_dir = work_dir / f"M{modulus}-N{length}-{model}-w{point['hidden_size']}-lr{point['learning_rate']}-s{seed}"
    shutil.rmtree(out_dir, ignore_errors=True)
    config = run_config(model, point, modulus, length, seed, study, out_dir)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    model_args, data_args, training_args = parse_run_args([f.name])
    Path(f.name).unlink()
    tokenizer = build_tokenizer(model_args)
    train_set, validation_set = splits(modulus, length, seed, study)
    set_seed(training_args.seed)
    trainer = make_trainer(build_model(model_args, tokenizer), tokenizer, training_args, train_set, validation_set,
                           answer_accuracy_metric=True)
    run_trainer(trainer)
    curve = validation_curve(trainer.state.log_history)
    runtime = next(h["train_runtime"] for h in trainer.state.log_history if "train_runtime" in h)
    row = {"M": modulus, "N": length, "model": model, "hidden_size": point["hidden_size"],
           "learning_rate": point["learning_rate"], "seed": seed,
           "parameters": sum(p.numel() for p in trainer.model.parameters()),
           "flops_per_step": flops_per_step(trainer.model, study["batch_size"], length),
           "steps": trainer.state.global_step, "train_seconds": round(runtime, 1),
           "validation_accuracy": round([r for r in curve if "eval_accuracy" in r][-1]["eval_accuracy"], 4),
           "steps_to_95": steps_to_target(curve)}
    curve_rows = [{"M": modulus, "N": length, "model": model, "hidden_size": point["hidden_size"],
                   "learning_rate": point["learning_rate"], "seed": seed, **r} for r in curve]
    shutil.rmtree(out_dir, ignore_errors=True)  # the models are not kept; the CSVs are the result
    return trainer.model, row, curve_rows


def run_block(model: str, modulus: int, length: int, study: dict, work_dir: Path):
    """Tune on validation with seed 0, then the chosen point with every seed, tested once."""
    first, *others = study["seeds"]
    tuned = [train_one(model, point, modulus, length, first, study, work_dir) for point in study["grid"]]
    best = max(range(len(tuned)), key=lambda i: (tuned[i][1]["validation_accuracy"], -i))
    task = test_data(modulus, length, study["test_examples"])
    rows, curves = [], []
    for i, (net, row, curve) in enumerate(tuned):
        chosen = i == best
        rows.append({**row, "chosen": int(chosen), "test_accuracy": round(test_accuracy(net, task), 4) if chosen else ""})
        curves += curve
    for seed in others:
        net, row, curve = train_one(model, study["grid"][best], modulus, length, seed, study, work_dir)
        rows.append({**row, "chosen": 1, "test_accuracy": round(test_accuracy(net, task), 4)})
        curves += curve
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows, curves


# ---------------------------------------------------------------------------------------------------------------
# render(folder): tables.md from the folder's files alone
# ---------------------------------------------------------------------------------------------------------------


def _cells_done(runs: list[dict]) -> list[tuple[int, int]]:
    """The cells with runs, in run order."""
    return list(dict.fromkeys((r["M"], r["N"]) for r in runs))


def _chosen(runs, cell, model):
    return [r for r in runs if (r["M"], r["N"]) == cell and r["model"] == model and r["chosen"] == 1]


def _mean_std(values) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def _point(row) -> str:
    return f"w{row['hidden_size']}, lr {row['learning_rate']:g}"


def render(folder: Path) -> str:
    folder = Path(folder)
    record = read_run_record(folder)
    study = record["study"]
    runs = read_csv(folder / "runs.csv")
    test_sets = {(r["M"], r["N"]): r for r in read_csv(folder / "test_set.csv")}
    models = list(LAYER_TYPES)
    cells = sorted(c for c in _cells_done(runs) if all(_chosen(runs, c, m) for m in models))
    planned = [tuple(c) for c in study["cells"]]
    missing = [c for c in planned if c not in cells]
    grid = study["grid"]
    first = study["seeds"][0]

    setup = [
        f"- cells (M, N): {', '.join(f'({m}, {n})' for m, n in planned)}; "
        + ("all were run." if not missing else f"not run (time ran out): {', '.join(f'({m}, {n})' for m, n in missing)}."),
        "- grid, the same for both models: " + "; ".join(_point(p) for p in grid) +
        f" ({len(grid)} points: width w, learning rate lr), each trained {study['steps']} steps at batch "
        f"{study['batch_size']} with seed {first}.",
        f"- validation: {study['validation_examples']} sequences per run (the run's own validation seed), evaluated every "
        f"{study['eval_every']} steps; the point with the best final validation accuracy is chosen.",
        f"- the chosen point is trained with seeds {', '.join(str(s) for s in study['seeds'])}; each chosen model is "
        f"scored once on {study['test_examples']} test sequences (seed {TEST_SEED}).",
    ]

    acc_rows, grid_rows, reach_rows, compute_rows = [], [], [], []
    verdict = {"tensor": [], "standard": [], "level": []}
    higher = {m: [] for m in models}
    solved = {m: [] for m in models}
    for cell in cells:
        stats = test_sets[cell]
        means = {}
        for model in models:
            chosen = sorted(_chosen(runs, cell, model), key=lambda r: r["seed"])
            accs = [r["test_accuracy"] for r in chosen]
            means[model] = (np.mean(accs), np.std(accs))
            if np.mean(accs) >= TARGET:
                solved[model].append(cell)
            acc_rows.append([cell[0], cell[1], model, _point(chosen[0]), f"{chosen[0]['parameters']:,}",
                             " / ".join(f"{a:.3f}" for a in accs), _mean_std(accs),
                             f"{stats['positive_rate']:.3f}", f"{stats['position_only_accuracy']:.3f}"])
            tuned = [r for r in runs if (r["M"], r["N"]) == cell and r["model"] == model and r["seed"] == first]
            by_point = {(r["hidden_size"], r["learning_rate"]): r for r in tuned}
            grid_rows.append([cell[0], cell[1], model] + [
                f"{by_point[(p['hidden_size'], p['learning_rate'])]['validation_accuracy']:.3f}" for p in grid])
            reach = []
            for width in dict.fromkeys(p["hidden_size"] for p in grid):
                steps = [r["steps_to_95"] for r in tuned if r["hidden_size"] == width and r["steps_to_95"] != ""]
                reach.append(f"{min(steps)}" if steps else f"not in {study['steps']}")
            reached_seeds = [r for r in chosen if r["steps_to_95"] != ""]
            reach.append(f"{len(reached_seeds)} of {len(chosen)}")
            reach_rows.append([cell[0], cell[1], model, *reach])
            every = [r for r in runs if (r["M"], r["N"]) == cell and r["model"] == model]

            def step_flops(r):
                return r["flops_per_step"] + attention_core_flops(model, r["hidden_size"], r["N"], study["batch_size"])

            compute_rows.append([cell[0], cell[1], model,
                                 " / ".join(f"{step_flops(r) / 1e9:.2f}" for r in tuned),
                                 f"{sum(step_flops(r) * r['steps'] for r in every) / 1e12:.2f}",
                                 f"{sum(r['train_seconds'] for r in every):.0f}", len(every)])
        (t_mean, t_std), (s_mean, s_std) = means["tensor"], means["standard"]
        if t_mean != s_mean:
            higher["tensor" if t_mean > s_mean else "standard"].append(cell)
        margin = max(AHEAD["points"], AHEAD["stds"] * max(t_std, s_std))
        if t_mean - s_mean > margin:
            verdict["tensor"].append(cell)
        elif s_mean - t_mean > margin:
            verdict["standard"].append(cell)
        else:
            verdict["level"].append(cell)

    def cell_list(cs):
        return ", ".join(f"(M={m}, N={n})" for m, n in cs) or "none"

    widths = list(dict.fromkeys(p["hidden_size"] for p in grid))
    sections = [
        ("Setup", setup),
        (f"Test accuracy of the validation-chosen configuration (seeds {', '.join(str(s) for s in study['seeds'])})",
         markdown_table(["M", "N", "model", "chosen (validation)", "parameters", "test accuracy per seed",
                         "mean ± std", "test positives", "best guess from position"],
                        acc_rows, "rrlllrrrr")),
        (f"Final validation accuracy of every grid point (seed {first})",
         markdown_table(["M", "N", "model", *(_point(p) for p in grid)], grid_rows, "rrl" + "r" * len(grid))),
        (f"What it takes to reach {TARGET:.0%} validation accuracy",
         [f"Fewest steps (of {study['steps']}, evaluated every {study['eval_every']}) at which any grid point of that "
          f"width reached {TARGET:.0%} with seed {first}; last column: chosen-configuration runs that reached it.", "",
          *markdown_table(["M", "N", "model", *(f"width {w}" for w in widths), "chosen runs reaching it"],
                          reach_rows, "rrl" + "r" * (len(widths) + 1))]),
        ("Compute",
         [f"GFLOPs per training step (one forward and backward of a batch of {study['batch_size']}: the matmuls "
          "outside the attention core as torch's FlopCounterMode counts them, plus the attention core's useful "
          "FLOPs, 4 d per allowed pair or triple, three times for forward and backward) "
          "for each grid point, then the whole block (tuning and seeds): total TFLOPs and train seconds "
          "(wall time on the machine above; it was shared, so seconds are indicative only).", "",
          *markdown_table(["M", "N", "model", "GFLOPs per step (" + " / ".join(_point(p) for p in grid) + ")",
                           "TFLOPs in all", "train seconds in all", "runs"], compute_rows, "rrlrrrr")]),
        ("Verdict (computed from the test table)",
         [f"A model is ahead when its mean test accuracy exceeds the other's by more than {AHEAD['points']} and by "
          f"more than {AHEAD['stds']} times the larger standard deviation over seeds.", "",
          f"- tensor ahead: {cell_list(verdict['tensor'])}.",
          f"- standard ahead: {cell_list(verdict['standard'])}.",
          f"- level: {cell_list(verdict['level'])}.",
          f"- higher mean whatever the margin: tensor at {cell_list(higher['tensor'])}; standard at "
          f"{cell_list(higher['standard'])}.",
          f"- mean test accuracy at least {TARGET:.0%}: tensor at {cell_list(solved['tensor'])}; standard at "
          f"{cell_list(solved['standard'])}."]),
    ]
    return render_document(record, sections)


def plot(curve_rows: list[dict], runs: list[dict], path: Path) -> None:
    plt = pyplot()
    colors = {"tensor": "tab:red", "standard": "tab:blue"}
    cells = sorted(_cells_done(runs))
    fig, axes = plt.subplots(1, max(len(cells), 1), figsize=(3.6 * max(len(cells), 1), 3.4), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        for model in LAYER_TYPES:
            for i, run in enumerate(_chosen(runs, cell, model)):
                key = (run["hidden_size"], run["learning_rate"], run["seed"])
                rows = [r for r in curve_rows if (r["M"], r["N"], r["model"]) == (*cell, model)
                        and (r["hidden_size"], r["learning_rate"], r["seed"]) == key and r.get("eval_accuracy") != ""
                        and r.get("eval_accuracy") is not None]
                ax.plot([r["step"] for r in rows], [r["eval_accuracy"] for r in rows], color=colors[model],
                        alpha=0.7, marker=".", label=f"{model} ({_point(run)})" if i == 0 else None)
        ax.axhline(TARGET, color="gray", linestyle=":", linewidth=1)
        ax.set(xlabel="step", title=f"M={cell[0]}, N={cell[1]}", ylim=(0.5, 1.0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation accuracy (answer tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="where the CSVs, run.json, the PNG and tables.md go")
    parser.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "match3-experiment",
                        help="per-run output_dir parent (deleted after each run) and the finished blocks (blocks/)")
    parser.add_argument("--quick", action="store_true", help="one tiny cell, two grid points, a few steps (smoke run)")
    parser.add_argument("--cells", nargs="+", default=None, metavar="M,N",
                        help="run only these cells of the study (e.g. to share the sweep between two processes on "
                             "one --work_dir): a partial run, which publishes the blocks finished so far outside "
                             "docs/; the plain command then gathers every finished block into docs/match3/")
    parser.add_argument("--from-csv", action="store_true", help="train nothing: rebuild tables.md from --out's files")
    # One thread: on a shared 2-core machine, two threads were many times slower per step whenever another process
    # held a core (OpenMP waits for the descheduled thread).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    study = QUICK if args.quick else STUDY
    if args.cells is not None:
        try:
            args.cells = [[int(v) for v in cell.split(",")] for cell in args.cells]
        except ValueError:
            parser.error(f"--cells {args.cells}: each cell is M,N (two ints), e.g. 16,12")
        unknown = [cell for cell in args.cells if cell not in study["cells"]]
        if unknown:
            parser.error(f"--cells: {unknown} are not cells of the study; allowed: {study['cells']}")
    args.out = output_dir(parser, args.out, NAME, full=not args.quick and args.cells is None)
    return args


def task_key(task: Match3Task) -> tuple[int, int, int]:
    return task.modulus, task.length, task.num_examples


def block_path(work_dir: Path, modulus: int, length: int, model: str, study: dict) -> Path:
    # The block's name carries the study's settings, so a changed study never reuses an old block.
    tag = hashlib.sha256(json.dumps(study, sort_keys=True).encode()).hexdigest()[:8]
    return work_dir / "blocks" / f"{tag}-M{modulus}-N{length}-{model}.json"


def gather(study: dict, work_dir: Path) -> list[dict]:
    """The finished blocks of the study, in the study's order."""
    blocks = []
    for modulus, length in study["cells"]:
        for model in LAYER_TYPES:
            path = block_path(work_dir, modulus, length, model, study)
            if path.exists():
                blocks.append(json.loads(path.read_text()))
    return blocks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_csv:
        print(publish(args.out, render))
        return 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    study = QUICK if args.quick else STUDY
    record = machine()
    for modulus, length in args.cells or study["cells"]:
        for model in LAYER_TYPES:
            path = block_path(args.work_dir, modulus, length, model, study)
            if path.exists():
                continue  # finished by an earlier or a parallel run
            before = load_snapshot()
            rows, curves = run_block(model, modulus, length, study, args.work_dir)
            task = test_task(modulus, length, study["test_examples"])
            block = {"rows": rows, "curves": curves, "test_set": {"M": modulus, "N": length,
                                                                  **task.describe(test_data(*task_key(task)))},
                     "load": [before, load_snapshot()]}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(block))
            write_results(args.out, study, gather(study, args.work_dir), record, argv)
    print(write_results(args.out, study, gather(study, args.work_dir), record, argv))
    return 0


def write_results(out: Path, study: dict, blocks: list[dict], record: dict, argv) -> str:
    """All finished blocks as the CSVs, run.json, PNG and tables.md: an unfinished study publishes its done cells."""
    runs = [row for b in blocks for row in b["rows"]]
    curves = [row for b in blocks for row in b["curves"]]
    test_sets = list({(b["test_set"]["M"], b["test_set"]["N"]): b["test_set"] for b in blocks}.values())
    write_csv(out / "runs.csv", runs, record)
    write_csv(out / "curves.csv", curves, record)
    write_csv(out / "test_set.csv", test_sets, record)
    samples = [s for b in blocks for s in b["load"]]
    busy = [s["busy"] for s in samples if s["busy"] is not None]
    averages = [s["loadavg"] for s in samples if s["loadavg"] is not None]
    load = (f"other processes, sampled before and after each of the {len(blocks)} training blocks: "
            + (f"{min(busy):.0%}–{max(busy):.0%} of the cores busy" if busy else "busy share unknown")
            + (f", 1-min load average {min(averages):.2f}–{max(averages):.2f}" if averages else ""))
    write_run_record(out, run_record(MODULE, argv, TITLE, record, load, study=study))
    plot(curves, runs, out / "curves.png")
    return publish(out, render)


if __name__ == "__main__":
    sys.exit(main())
