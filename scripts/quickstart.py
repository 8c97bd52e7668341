"""The main demo: train a tiny tensor-attention LM on built-in synthetic text for about a minute on CPU with
transformers' Trainer (the same steps as scripts/train.py), save it, reload it through the Auto classes, and generate
with each KV-cache layout.

The task: lines like "|adgjmpsvybeh" -- an arithmetic progression of letters (mod 26, step 1..12) whose step the
model must read off the prompt's first letters and continue. No download: the data is generated here.

    python scripts/quickstart.py [--steps 800] [--out runs/quickstart] [--min-exact 0.5]

It exits non-zero when any cache layout gets fewer than `--min-exact` of the continuations exactly right.
"""

from __future__ import annotations

import argparse
import random
import string
import sys
import time

from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed

import hf_tensor_attn
from hf_tensor_attn import TensorAttnByteTokenizer
from hf_tensor_attn.cache import LAYOUTS
from hf_tensor_attn.training import make_trainer, run_trainer

LETTERS = string.ascii_lowercase
BATCH_SIZE = 32


def progression(rng: random.Random, length: int = 12) -> str:
    start, step = rng.randrange(26), rng.randrange(1, 13)
    return "|" + "".join(LETTERS[(start + i * step) % 26] for i in range(length))


def training_lines(tokenizer, rng: random.Random, num_lines: int) -> Dataset:
    """Fresh lines for every step, as model inputs; the labels are the input ids (the model shifts them)."""
    ids = tokenizer([progression(rng) for _ in range(num_lines)]).input_ids
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids], "labels": ids})


def train(args: argparse.Namespace) -> None:
    set_seed(args.seed)
    config = AutoConfig.for_model(
        "tensor_attn", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        layer_types=["tensor_attention", "full_attention"],
    )
    tokenizer = TensorAttnByteTokenizer.for_config(config)
    model = AutoModelForCausalLM.from_config(config)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {type(model).__name__}, layers {config.layer_types}, {num_params / 1e3:.0f}k parameters")
    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=BATCH_SIZE, learning_rate=3e-3,
        lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.01, max_grad_norm=1.0, optim="adamw_torch",
        logging_steps=50, save_strategy="no", report_to="none", seed=args.seed,
    )
    data = training_lines(tokenizer, random.Random(args.seed), args.steps * BATCH_SIZE)
    started = time.time()
    run_trainer(make_trainer(model, tokenizer, training_args, data))
    print(f"trained {args.steps} steps in {time.time() - started:.0f} s; saved model and tokenizer to {args.out}")


def exact_continuations(args: argparse.Namespace) -> list[str]:
    """Reload the saved model and tokenizer through the Auto classes, continue 64 prompts greedily with every cache
    layout, and return the layouts that got fewer than `--min-exact` of them exactly right."""
    model = AutoModelForCausalLM.from_pretrained(args.out).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    print(f"reloaded: {type(model).__name__} + {type(tokenizer).__name__} via AutoModelForCausalLM / AutoTokenizer")

    test_rng = random.Random(args.seed + 1)
    lines = [progression(test_rng) for _ in range(64)]
    prompts = [line[:3] for line in lines]  # "|" and two letters: enough to know the step
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    failed = []
    # "poly" changes the kernel (exp -> polynomial) of a model trained with exp: not expected to continue exactly.
    layouts = [n for n in hf_tensor_attn.available_cache_implementations() if not LAYOUTS[n].changes_the_kernel]
    for layout in layouts:
        began = time.time()
        generated = model.generate(**inputs, max_new_tokens=10, do_sample=False, cache_implementation=layout)
        texts = tokenizer.batch_decode(generated[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
        correct = sum(prompt + text == line for prompt, text, line in zip(prompts, texts, lines))
        print(f"generate(cache_implementation={layout!r}): {correct}/{len(lines)} continuations exact "
              f"({time.time() - began:.1f} s); e.g. {prompts[0]!r} -> {texts[0]!r}")
        if correct < args.min_exact * len(lines):
            failed.append(layout)
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps")
    parser.add_argument("--out", default="runs/quickstart", help="where the model and tokenizer are saved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-exact", type=float, default=0.5,
                        help="exit non-zero when a layout gets fewer than this fraction of continuations exact")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    train(args)
    failed = exact_continuations(args)
    if failed:
        # A trained model that cannot continue its own task through a cache means a broken install, not bad luck.
        sys.exit(f"FAILED: fewer than {args.min_exact:.0%} exact continuations with {failed}; the package does not "
                 "work in this environment (check the transformers version against configs/constraints.txt)")


if __name__ == "__main__":
    main()
