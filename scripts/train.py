#!/usr/bin/env python
"""Train a tensor-attention causal LM from a JSON run config.

    python scripts/train.py configs/match3-tensor.json [--key=value ...]
    accelerate launch --num_processes 2 --cpu scripts/train.py configs/match3-tensor.json --max_steps=30 --output_dir=DIR

Overrides: `--max_steps=30`, `--output_dir=DIR`, `--bf16=true`, `--gradient_checkpointing=true`,
`--model.hidden_size=128`, `--resume_from_checkpoint=true` (latest checkpoint in output_dir) or
`--resume_from_checkpoint=DIR/checkpoint-200`. See `hf_tensor_attn.training` for the config format and
docs/training.md for examples.

`accelerate launch --cpu --num_processes N` (N > 1, no `--mpirun_hostfile`) starts a single process; this script
then starts the N DDP workers itself through `torch.distributed.run` (gloo), so the command trains on N processes
as it says. Writes the model, tokenizer, trainer_state.json and run_config.json to output_dir.
"""

from __future__ import annotations

import sys

from hf_tensor_attn.training import load_config, relaunch_cpu_ddp, requested_cpu_processes, train


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        config = load_config(argv[0], argv[1:])
    except (ValueError, OSError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    processes = requested_cpu_processes()
    if processes > 1:
        # accelerate's --cpu launcher started one process for N; run the N DDP workers ourselves.
        return relaunch_cpu_ddp(__file__, argv, processes)
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
