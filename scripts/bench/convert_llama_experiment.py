#!/usr/bin/env python
"""From a pretrained Llama to a hybrid tensor-attention model: does fine-tuning the converted model beat training the
Llama on for the same number of steps?

    python -m scripts.bench.convert_llama_experiment [--out DIR]
    python -m scripts.bench.convert_llama_experiment --quick --out /tmp/cl     # a smoke run: a few steps

1. A small `LlamaForCausalLM` (grouped key/value heads) is trained from scratch on Match3 (`hf_tensor_attn.data`),
   through `scripts/train.py`'s Trainer path (`init_from` a freshly initialised Llama saved with the byte tokenizer).
2. From that checkpoint, for the same number of steps, the same data order and optimiser settings:
   - "llama": the Llama trains on;
   - "tensor@L": `convert_from_llama(checkpoint, tensor_layers=L)` (exact at step 0: k2 = v2 = 1) is fine-tuned
     fully, for one and for two tensor layers.
   Every arm starts its own optimiser and schedule, so the comparison is of the models, not of a warm optimiser.
3. All final models are evaluated on one held-out test set from a seed no run trains or validates on.

Writes to --out (default docs/convert_llama/ for the full run, runs/bench/convert_llama/ for --quick):
- convert_llama_curves.csv   arm, step, train_loss, eval_loss, eval_accuracy (held-out validation during training)
- convert_llama_summary.csv  arm, tensor_layers, parameters, steps, train_seconds, step0 logit difference, test_accuracy
- convert_llama_curves.png   held-out accuracy and loss against steps, pretraining then the three continuations
- tables.md                  the summary and what the test set itself allows
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
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_tensor_attn import TensorAttnByteTokenizer, convert_from_llama
from hf_tensor_attn.arguments import parse_args as parse_run_args
from hf_tensor_attn.data import Match3Task
from hf_tensor_attn.training import train
from scripts.bench.harness import (
    ROOT, describe_load, load_snapshot, machine, markdown_table, output_dir, publish, pyplot, read_csv,
    read_run_record, render_document, run_record, write_csv, write_run_record,
)
from scripts.bench.match3_experiment import TEST_SEED, test_accuracy, validation_curve

NAME = "convert_llama"
LLAMA = dict(vocab_size=259, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)
ARMS = {"llama": None, "tensor@[1]": [1], "tensor@[0, 1]": [0, 1]}
RUN = dict(task="match3", modulus=16, length=16, positive_rate=0.5, num_train_examples=20000, num_eval_examples=500,
           per_device_train_batch_size=64, per_device_eval_batch_size=250, lr_scheduler_type="cosine",
           warmup_steps=0.05, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", logging_steps=10,
           eval_strategy="steps", eval_steps=25, save_strategy="no", seed=0, task_seed=0, report_to="none",
           dataloader_drop_last=True, disable_tqdm=True)
FULL = dict(pretrain_steps=300, pretrain_lr=3e-3, finetune_steps=150, finetune_lr=1e-3, test_examples=2000)
QUICK = dict(pretrain_steps=4, pretrain_lr=3e-3, finetune_steps=4, finetune_lr=1e-3, test_examples=64)
QUICK_RUN = dict(length=8, num_train_examples=256, num_eval_examples=32, per_device_train_batch_size=16,
                 per_device_eval_batch_size=16, eval_steps=2, logging_steps=1)


def run_trainer(work: Path, name: str, init_from: Path, steps: int, lr: float, run: dict):
    """Train the model saved in `init_from` with scripts/train.py's Trainer path (which saves the model and tokenizer
    into work/name); returns the trainer."""
    config = work / f"{name}.json"
    config.write_text(json.dumps({**run, "max_steps": steps, "learning_rate": lr, "output_dir": str(work / name)}))
    return train(*parse_run_args([str(config), f"--init_from={init_from}"]))


def step0_difference(llama_dir: Path, converted, run: dict) -> float:
    """Largest |logit difference| between the Llama checkpoint and its conversion on held-out sequences."""
    llama = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    data = Match3Task(run["modulus"], run["length"], 64, TEST_SEED + 1, run["positive_rate"]).build()
    ids = torch.tensor(data["input_ids"])
    with torch.no_grad():
        return (llama(ids).logits - converted.eval()(ids).logits).abs().max().item()


def plot(curve_rows: list[dict], pretrain_steps: int, path: Path) -> None:
    plt = pyplot()
    colors = {"pretrain": "black", "llama": "tab:blue", "tensor@[1]": "tab:red", "tensor@[0, 1]": "tab:orange"}
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, color in colors.items():
        rows = [r for r in curve_rows if r["arm"] == arm and r.get("eval_accuracy") not in (None, "")]
        offset = 0 if arm == "pretrain" else pretrain_steps
        steps = [r["step"] + offset for r in rows]
        acc_ax.plot(steps, [r["eval_accuracy"] for r in rows], color=color, marker=".", label=arm)
        loss_ax.plot(steps, [r["eval_loss"] for r in rows], color=color, marker=".", label=arm)
    for ax in (acc_ax, loss_ax):
        ax.axvline(pretrain_steps, color="gray", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
        ax.legend()
    acc_ax.set(xlabel="step (pretraining, then continuation)", ylabel="held-out answer accuracy",
               title="Match3: Llama, then Llama vs converted")
    loss_ax.set(xlabel="step (pretraining, then continuation)", ylabel="held-out loss (answer tokens)",
                title="held-out loss", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_tables(summary: list[dict], run: dict, sizes: dict) -> list[tuple[str, list[str]]]:
    rows = [[r["arm"], r["tensor_layers"], f"{r['parameters']:,}", f"{r['steps']:,}", f"{r['train_seconds']:.0f}",
             f"{r['step0_max_logit_diff']:.1e}" if r["step0_max_logit_diff"] != "" else "-",
             f"{r['final_eval_loss']:.4f}", f"{r['test_accuracy']:.4f}"] for r in summary]
    task = Match3Task(run["modulus"], run["length"], sizes["test_examples"], TEST_SEED, run["positive_rate"])
    test_set = task.build()
    stats = task.describe(test_set)
    # The sentences below the table: the size of the test set in answers, the binomial standard error of an accuracy
    # like the reference arm's (the first row), and each arm's training time as a multiple of the reference arm's.
    answers = int(np.asarray(test_set["answers"]).size)
    reference = summary[0]
    accuracy = float(reference["test_accuracy"])
    standard_error = (accuracy * (1 - accuracy) / answers) ** 0.5
    # A quick run on a fast machine can train in under a millisecond: no ratio then, rather than a division by zero.
    cost = ", ".join(f"{r['arm']} " + (f"{float(r['train_seconds']) / float(reference['train_seconds']):.1f}x"
                                       if float(reference["train_seconds"]) > 0 else "n/a") for r in summary[1:])
    notes = ["",
             f"Test answers: {answers:,}; the binomial standard error of an accuracy of {accuracy:.4f} over them is "
             f"{standard_error:.4f}.",
             "",
             f"Train seconds as a multiple of the {reference['arm']} arm's: {cost}."]
    return [
        (f"Continuation for {sizes['finetune_steps']} steps after {sizes['pretrain_steps']} pretraining steps "
         f"(M={run['modulus']}, N={run['length']}; test: {sizes['test_examples']} sequences)",
         markdown_table(["arm", "tensor layers", "parameters", "steps", "train seconds",
                         "step-0 max logit diff vs Llama", "final held-out loss", "test accuracy"], rows, "llrrrrrr")
         + notes),
        ("The test set", markdown_table(["positive answers", "best guess from the position alone"],
                                        [[f"{stats['positive_rate']:.3f}", f"{stats['position_only_accuracy']:.3f}"]],
                                        "rr")),
    ]


TITLE = "Match3: a pretrained Llama trained on vs converted to tensor attention and fine-tuned"


def render(folder: Path) -> str:
    """tables.md from the summary CSV and the run record alone (the publishing convention in harness.py)."""
    record = read_run_record(folder)
    summary = read_csv(Path(folder) / "convert_llama_summary.csv")
    return render_document(record, summary_tables(summary, record["run"], record["sizes"]))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="where the CSVs, the PNG and tables.md go")
    parser.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "convert-llama-experiment",
                        help="checkpoints and run configs of every arm")
    parser.add_argument("--quick", action="store_true", help="a few steps on short sequences (a smoke run)")
    parser.add_argument("--from-csv", type=Path, default=None, metavar="FOLDER",
                        help="train nothing: rebuild tables.md and the plot from FOLDER's CSVs and run.json")
    # One thread: on a shared 2-core machine a second OpenMP thread waits on the descheduled one.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.from_csv is None:
        args.out = output_dir(parser, args.out, NAME, not args.quick)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_csv is not None:
        curve_rows = read_csv(args.from_csv / "convert_llama_curves.csv")
        plot(curve_rows, read_run_record(args.from_csv)["sizes"]["pretrain_steps"],
             args.from_csv / "convert_llama_curves.png")
        print(publish(args.from_csv, render))
        return 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    run = {**RUN, **(QUICK_RUN if args.quick else {})}
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    load_before = load_snapshot()

    torch.manual_seed(run["seed"])
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(work / "llama-init")
    TensorAttnByteTokenizer(model_max_length=LLAMA["max_position_embeddings"]).save_pretrained(work / "llama-init")
    pretrain = run_trainer(work, "llama-pretrained", work / "llama-init", sizes["pretrain_steps"], sizes["pretrain_lr"],
                           run)
    curve_rows = [{"arm": "pretrain", **row} for row in validation_curve(pretrain.state.log_history)]
    pretrained = work / "llama-pretrained"

    summary = []
    for arm, layers in ARMS.items():
        start, diff = pretrained, ""
        if layers is not None:
            converted = convert_from_llama(str(pretrained), layers)
            diff = step0_difference(pretrained, converted, run)
            start = work / f"converted-{len(layers)}"
            converted.save_pretrained(start)
            TensorAttnByteTokenizer.from_pretrained(pretrained).save_pretrained(start)
        trainer = run_trainer(work, f"continue-{arm}", start, sizes["finetune_steps"], sizes["finetune_lr"], run)
        data_args = parse_run_args([str(work / f"continue-{arm}.json")])[1]
        log = trainer.state.log_history
        rows = validation_curve(log)
        curve_rows += [{"arm": arm, **row} for row in rows]
        evals = [r for r in rows if "eval_loss" in r]
        summary.append({
            "arm": arm, "tensor_layers": "-" if layers is None else str(layers),
            "parameters": sum(p.numel() for p in trainer.model.parameters()), "steps": trainer.state.global_step,
            "train_seconds": round(next(h["train_runtime"] for h in log if "train_runtime" in h), 3),
            "step0_max_logit_diff": diff, "final_eval_loss": round(evals[-1]["eval_loss"], 4),
            "test_accuracy": round(test_accuracy(trainer.model, Match3Task(
                data_args.modulus, data_args.length, sizes["test_examples"], TEST_SEED, data_args.positive_rate).build()), 4),
        })
        print(json.dumps(summary[-1]), flush=True)
    load_after = load_snapshot()

    record = machine()
    columns = ("arm", "step", "train_loss", "eval_loss", "eval_accuracy")
    write_csv(args.out / "convert_llama_curves.csv", [{k: r.get(k) for k in columns} for r in curve_rows], record)
    write_csv(args.out / "convert_llama_summary.csv", summary, record)
    plot(curve_rows, sizes["pretrain_steps"], args.out / "convert_llama_curves.png")
    write_run_record(args.out, run_record(f"scripts.bench.{Path(__file__).stem}", argv, TITLE, record,
                                          describe_load(load_before, load_after), run=run, sizes=sizes))
    print(publish(args.out, render))
    return 0


if __name__ == "__main__":
    sys.exit(main())
