"""The main demo: train a tiny tensor-attention LM on built-in synthetic text for about a minute on CPU, save it,
reload it through the Auto classes, and generate with each KV-cache layout.

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

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import hf_tensor_attn
from hf_tensor_attn import TensorAttnByteTokenizer

LETTERS = string.ascii_lowercase


def progression(rng: random.Random, length: int = 12) -> str:
    start, step = rng.randrange(26), rng.randrange(1, 13)
    return "|" + "".join(LETTERS[(start + i * step) % 26] for i in range(length))


def batch(tok, rng, size):
    return tok([progression(rng) for _ in range(size)], return_tensors="pt").input_ids


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

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = TensorAttnByteTokenizer()
    config = AutoConfig.for_model(
        "tensor_attn", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        layer_types=["tensor_attention", "full_attention"],
    )
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {type(model).__name__}, layers {config.layer_types}, {n_params / 1e3:.0f}k parameters")

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    start = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        ids = batch(tok, rng, 32)
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - start:.0f} s)")

    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"saved model and tokenizer to {args.out}")

    model = AutoModelForCausalLM.from_pretrained(args.out).eval()
    tok = AutoTokenizer.from_pretrained(args.out)
    print(f"reloaded: {type(model).__name__} + {type(tok).__name__} via AutoModelForCausalLM / AutoTokenizer")

    test_rng = random.Random(args.seed + 1)
    lines = [progression(test_rng) for _ in range(64)]
    prompts = [line[:3] for line in lines]  # "|" and two letters: enough to know the step
    inputs = tok(prompts, return_tensors="pt", padding=True)
    failed = []
    for layout in hf_tensor_attn.available_cache_implementations():
        began = time.time()
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False, cache_implementation=layout)
        texts = tok.batch_decode(out[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
        correct = sum(p + t == line for p, t, line in zip(prompts, texts, lines))
        print(f"generate(cache_implementation={layout!r}): {correct}/{len(lines)} continuations exact "
              f"({time.time() - began:.1f} s); e.g. {prompts[0]!r} -> {texts[0]!r}")
        if correct < args.min_exact * len(lines):
            failed.append(layout)
    if failed:
        # A trained model that cannot continue its own task through a cache means a broken install, not bad luck.
        sys.exit(f"FAILED: fewer than {args.min_exact:.0%} exact continuations with {failed}; the package does not "
                 "work in this environment (check the transformers version against configs/constraints.txt)")


if __name__ == "__main__":
    main()
