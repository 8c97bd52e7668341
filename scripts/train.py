#!/usr/bin/env python
"""Train a tensor-attention causal LM with transformers' Trainer from a JSON or YAML run config plus overrides.

    python scripts/train.py configs/match3-tensor.json [--key value | --key=value ...]
    torchrun --nproc_per_node 2 scripts/train.py configs/match3-tensor.json --max_steps 30 --output_dir runs/ddp
    python scripts/train.py --help        # every key: ModelArguments, DataArguments, TrainingArguments fields

See `hf_tensor_attn.arguments` for the config format and docs/training.md for examples. Writes the model,
tokenizer, trainer_state.json and run_config.json to output_dir.
"""

from __future__ import annotations

import sys

from hf_tensor_attn.arguments import parse_args
from hf_tensor_attn.training import train


def main(argv: list[str] | None = None) -> int:
    try:
        arguments = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    train(*arguments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
