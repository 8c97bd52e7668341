"""What each process runs in tests/training/test_parallel.py, launched by `torchrun` (2 CPU processes, gloo).

    python -m torch.distributed.run --nproc_per_node 2 tests/training/distributed_worker.py tp MODEL_DIR OUT_DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/training/distributed_worker.py fsdp MODEL_DIR OUT_DIR

Both load MODEL_DIR with transformers' own engine, `from_pretrained(..., distributed_config=DistributedConfig(...))`,
which applies the plans in TensorAttnConfig / TensorAttnForCausalLM, and write what the test compares with a
single process to OUT_DIR/rank{R}.pt. The inputs and the training run are defined once here, for both sides.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, TrainingArguments
from transformers.distributed import DistributedConfig

import hf_tensor_attn  # noqa: F401  (registers the model with the Auto classes)
from hf_tensor_attn.compat import output_cache
from hf_tensor_attn.data import match3_splits
from hf_tensor_attn.tokenization import TensorAttnByteTokenizer
from hf_tensor_attn.training import make_trainer

LAYOUTS = {
    "four_cache": None,
    "two_cache": None,
    # A window of 4 so that most tokens are summarised: the clusters are per head, hence split across ranks.
    "subgen4": {"recent_window": 4, "sink_tokens": 1, "delta": 0.5},
}
# Tensors of a cache layer that hold no head axis: every rank keeps them whole (token positions, padding, pair
# indices), so a rank's bytes are half the single-process bytes plus these.
REPLICATED = {"four_cache": (), "two_cache": ("pair_index",), "subgen4": ("real", "positions")}
NEW_TOKENS = 12
TRAIN_STEPS = 10
PER_RANK_BATCH = 4


def free_port() -> int:
    """A port no other process holds now: parallel test runs on one machine must not share a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[1, 40, 71, 99, 12, 250, 7], [0, 0, 1, 88, 33, 45, 9]])
    return ids, (ids != 0).long()


def replicated_bytes(cache, layout: str) -> int:
    total = 0
    for layer in cache.layers:
        for name in REPLICATED[layout]:
            t = getattr(layer, name, None)
            total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
    return total


def inference_record(model) -> dict:
    """Logits of one forward, and greedy tokens, scores and cache bytes of each layout."""
    ids, mask = prompts()
    with torch.no_grad():
        record = {"logits": model(ids, attention_mask=mask).logits}
    for layout, cache_config in LAYOUTS.items():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             return_dict_in_generate=True, output_scores=True, cache_implementation=layout,
                             cache_config=cache_config)
        cache = output_cache(out)
        record[layout] = {"sequences": out.sequences, "scores": torch.stack(out.scores),
                          "memory_bytes": cache.memory_bytes(), "replicated_bytes": replicated_bytes(cache, layout),
                          "heads": [layer.keys.shape[1] for layer in cache.layers]}
    return record


def training_args(output_dir, batch_size: int) -> TrainingArguments:
    # Sequential sampling: the global batch of each step is the same rows in one process or split over two.
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=TRAIN_STEPS, per_device_train_batch_size=batch_size,
        learning_rate=3e-3, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=0, train_sampling_strategy="sequential",
        dataloader_drop_last=True, use_cpu=True,
    )


def train(model, output_dir, batch_size: int):
    """10 Trainer steps on Match3; returns the trainer (its log_history holds the loss of every step)."""
    train_set, _ = match3_splits(8, 6, 0.5, 256, 8, 0)
    trainer = make_trainer(model, TensorAttnByteTokenizer(), training_args(output_dir, batch_size), train_set)
    trainer.train()
    return trainer


def full_state(model) -> dict[str, torch.Tensor]:
    """Every parameter as one full tensor (sharded ones gathered from all ranks), by name."""
    state = {}
    for name, param in model.named_parameters():
        param = param.detach()
        state[name] = param.full_tensor() if hasattr(param, "full_tensor") else param.clone()
    return state


def main(mode: str, model_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    rank = int(os.environ["RANK"])
    if mode == "tp":
        model = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=DistributedConfig(tp_size=2)).eval()
        record = inference_record(model)
    elif mode == "fsdp":
        model = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=DistributedConfig(fsdp_size=2))
        trainer = train(model, out / "trainer", PER_RANK_BATCH)
        record = {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "state": full_state(model)}
        trainer.save_model(str(out / "full"))  # gathered: one safetensors file, written by rank 0
        model.save_pretrained(out / "sharded", distributed_checkpoint=True)  # DCP: one shard file per rank
    else:
        raise ValueError(f"mode must be 'tp' or 'fsdp', got {mode!r}")
    record["world_size"] = dist.get_world_size()
    torch.save(record, out / f"rank{rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
