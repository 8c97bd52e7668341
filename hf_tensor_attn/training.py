"""Assemble and run transformers' `Trainer` for a tensor-attention causal LM: what `scripts/train.py` runs.

    from hf_tensor_attn.arguments import parse_args
    from hf_tensor_attn.training import train
    trainer = train(*parse_args(["configs/match3-tensor.json", "--max_steps", "300"]))

`train` builds the tokenizer, the datasets and the model from the run arguments (`hf_tensor_attn.arguments`), trains,
evaluates and writes the final model, tokenizer, `trainer_state.json` and `run_config.json` to output_dir.
`make_trainer` and `run_trainer` are the same steps for a model and datasets built elsewhere (scripts/quickstart.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from datasets import Dataset, IterableDataset, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.tokenization_utils_base import TOKENIZER_CONFIG_FILE
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from . import compat

from .arguments import DataArguments, ModelArguments, TensorAttnTrainingArguments, check_run, run_config
from .configuration import TensorAttnConfig
from .data import answer_accuracy, causal_lm_blocks, match3_splits, text_dataset
from .tokenization import TensorAttnByteTokenizer
from .tokenization_fast import TensorAttnByteTokenizerFast

logger = logging.get_logger(__name__)
# What a checkpoint must hold to be one at all, and what an exact resume also needs besides the weights.
CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                      "pytorch_model.bin", "pytorch_model.bin.index.json")


def _load_tokenizer(argument: str, source: str):
    try:
        return AutoTokenizer.from_pretrained(source)
    except json.JSONDecodeError as e:
        raise ValueError(f"`{argument}` {source!r}: its tokenizer_config.json is not valid JSON ({e}); it is most likely "
                         "truncated by an interrupted save: save the tokenizer there again") from e


def build_tokenizer(model_args: ModelArguments):
    """The named tokenizer; else the pretrained model's own when fine-tuning one; else the byte tokenizer."""
    if model_args.tokenizer_name is not None:
        return _load_tokenizer("tokenizer_name", model_args.tokenizer_name)
    if model_args.init_from is not None:
        local = Path(model_args.init_from).expanduser()
        if not local.is_dir() or (local / TOKENIZER_CONFIG_FILE).is_file():
            try:
                return _load_tokenizer("init_from", model_args.init_from)
            except OSError:
                pass  # a Hub model without a tokenizer
        # a model saved without a tokenizer: fall back to the byte tokenizer it was most likely trained with
    positions = model_args.max_position_embeddings or TensorAttnConfig.max_position_embeddings
    return TensorAttnByteTokenizer(model_max_length=positions)  # truncation keeps what the model has positions for


def _text_blocks(data_args: DataArguments, tokenizer, held_out: bool) -> Dataset | IterableDataset | None:
    """The training or the held-out blocks of a text run; None when no held-out data was given."""
    options = dict(block_size=data_args.block_size, text_column=data_args.text_column, num_proc=data_args.num_proc)
    if data_args.train_files is not None:
        argument = "eval_files" if held_out else "train_files"
        files = getattr(data_args, argument)
        if files is None:
            return None
        blocks = text_dataset(files, tokenizer, streaming=data_args.streaming, argument=argument, **options)
        source = f"`{argument}` {files}"
    else:
        split = data_args.eval_split if held_out else data_args.train_split
        if split is None:
            return None
        records = load_dataset(data_args.dataset_name, data_args.dataset_config_name, split=split,
                               streaming=data_args.streaming, num_proc=data_args.num_proc)
        blocks = causal_lm_blocks(records, tokenizer, **options)
        source = f"split {split!r} of `dataset_name` {data_args.dataset_name!r}"
    if isinstance(blocks, Dataset) and len(blocks) == 0:
        raise ValueError(f"{source} holds no block of block_size={data_args.block_size} tokens; give more text or "
                         "a smaller block_size")
    return blocks


def build_datasets(data_args: DataArguments, tokenizer) -> tuple[Dataset | IterableDataset, Dataset | None]:
    """Training and held-out data (None when there is none)."""
    if data_args.task == "match3":
        return match3_splits(data_args.modulus, data_args.length, data_args.positive_rate,
                             data_args.num_train_examples, data_args.num_eval_examples, data_args.task_seed)
    return _text_blocks(data_args, tokenizer, held_out=False), _text_blocks(data_args, tokenizer, held_out=True)


def build_model(model_args: ModelArguments, tokenizer):
    """A fresh model (a tokenizer other than the byte tokenizer sets its vocabulary size and special ids unless
    given), or the pretrained `init_from` with the config fields given as overrides; with LoRA adapters on `lora_r`."""
    overrides = model_args.config_overrides()
    if model_args.init_from is not None:
        model = AutoModelForCausalLM.from_pretrained(model_args.init_from, **overrides)
    else:
        if not isinstance(tokenizer, (TensorAttnByteTokenizer, TensorAttnByteTokenizerFast)):
            vocabulary = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                          "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
            overrides = {**vocabulary, **overrides}
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("tensor_attn", **overrides))
    if model_args.lora_r is not None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(task_type="CAUSAL_LM", r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                          lora_dropout=model_args.lora_dropout, target_modules=list(model_args.lora_target_modules))
        model = get_peft_model(model, lora)
    return model


def answer_metrics(eval_prediction) -> dict[str, float]:
    """Accuracy over answer tokens (labels != -100): the next-token prediction at each scored position."""
    return {"accuracy": answer_accuracy(eval_prediction.predictions, eval_prediction.label_ids)}


def argmax_logits(logits, labels):
    # Keeping only argmax ids spares Trainer from gathering [N, T, vocab] logits during evaluation.
    return logits.argmax(-1)


def param_checksum(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name and float32 bytes, in name order: equal iff the parameters are equal."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class ParamChecksumCallback(TrainerCallback):
    """Writes `param_checksums/rank{R}.json` into output_dir at the end of training, on every process: a DDP run
    whose ranks end with different parameters has diverged."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        directory = Path(args.output_dir) / "param_checksums"
        directory.mkdir(parents=True, exist_ok=True)
        record = {"rank": args.process_index, "world_size": args.world_size, "global_step": state.global_step,
                  "sha256": param_checksum(model)}
        (directory / f"rank{args.process_index}.json").write_text(json.dumps(record))


def _checkpoint_steps(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` folder in output_dir, newest first."""
    found = []
    for entry in output_dir.iterdir() if output_dir.is_dir() else ():
        prefix, _, step = entry.name.partition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and entry.is_dir():
            found.append((int(step), entry))
    return sorted(found, reverse=True)


def _missing(checkpoint: Path, names) -> list[str]:
    return [name for name in names if not (checkpoint / name).exists()]


def _missing_for_exact_resume(checkpoint: Path) -> list[str]:
    """The optimizer, scheduler and RNG state files the checkpoint lacks (an FSDP or DeepSpeed checkpoint holds its
    optimizer under other names starting with "optimizer")."""
    missing = []
    if not any(entry.name.startswith("optimizer") for entry in checkpoint.iterdir()):
        missing.append(compat.OPTIMIZER_NAME)
    missing += _missing(checkpoint, [compat.SCHEDULER_NAME])
    if not any(entry.name.startswith("rng_state") for entry in checkpoint.iterdir()):
        missing.append("rng_state.pth")
    return missing


def resolve_checkpoint(output_dir, resume_from_checkpoint, weights_only: bool = False) -> str | None:
    """The checkpoint folder to resume from, checked: `True` (or "true") means the newest *complete* checkpoint in
    output_dir, which it logs with the reason any newer one was skipped. A checkpoint without its optimizer,
    scheduler or RNG state cannot resume exactly: ValueError naming the missing file, unless `weights_only`."""
    if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() == "true":
        resume_from_checkpoint = True
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    essential = [compat.TRAINER_STATE_NAME]
    if resume_from_checkpoint is True:
        skipped = []
        for step, folder in _checkpoint_steps(Path(output_dir)):
            has_weights = any((folder / name).exists() for name in CHECKPOINT_WEIGHTS)
            missing = _missing(folder, essential) + ([] if has_weights else ["model weights"])
            if not missing:
                break
            skipped.append(f"{folder.name} (no {', no '.join(missing)}: a save that did not finish)")
        else:
            raise ValueError(f"`resume_from_checkpoint` true found no complete checkpoint in output_dir {str(output_dir)!r}"
                             f"{'; skipped ' + '; '.join(skipped) if skipped else ''}")
        why = f"; skipped the newer {'; '.join(skipped)}" if skipped else ""
        logger.warning(f"Resuming from {folder}: the newest complete checkpoint in {output_dir}{why}")
        checkpoint = folder
    else:
        checkpoint = Path(resume_from_checkpoint)
        if not checkpoint.is_dir():
            raise ValueError(f"`resume_from_checkpoint` {str(checkpoint)!r} is no folder; give a checkpoint-N folder "
                             "or true (the newest complete one in output_dir)")
        missing = _missing(checkpoint, essential)
        if missing:
            raise ValueError(f"`resume_from_checkpoint` {str(checkpoint)!r} has no {missing[0]}: it is no complete "
                             "checkpoint (an interrupted save?); give another one, or true for the newest complete one")
    missing = _missing_for_exact_resume(checkpoint)
    if missing and not weights_only:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} has no {', no '.join(missing)}: resuming from it would restart that state "
            "and the run would silently differ from an uninterrupted one; resume from a complete checkpoint, or pass "
            "resume_weights_only=true (--resume_weights_only=true) to restore its weights and step only"
        )
    if missing:
        logger.warning(f"Resuming from {checkpoint} without {', '.join(missing)} (resume_weights_only): the run will "
                       "differ from an uninterrupted one")
    return os.fspath(checkpoint)


class TensorAttnTrainer(Trainer):
    """transformers' `Trainer` with crash-safe checkpoints: a `checkpoint-N` folder appears only once complete
    (compat item 8), and `train(resume_from_checkpoint=...)` resumes only from a checked checkpoint
    (`resolve_checkpoint`; `args.resume_weights_only` allows one without optimizer or scheduler state)."""

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        weights_only = getattr(self.args, "resume_weights_only", False)
        checkpoint = resolve_checkpoint(self.args.output_dir, resume_from_checkpoint, weights_only)
        return super().train(checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        compat.save_checkpoint_staged(self, super()._save_checkpoint, model, trial)


def make_trainer(
    model,
    tokenizer,
    training_args: TrainingArguments,
    train_dataset,
    eval_dataset=None,
    answer_accuracy_metric: bool = False,
    callbacks: list[TrainerCallback] = (),
) -> Trainer:
    """A `Trainer` on rows that are already model inputs (input_ids, attention_mask, labels of one length);
    `answer_accuracy_metric` adds the accuracy over answer tokens (labels != -100) to each evaluation."""
    callbacks = list(callbacks)
    if getattr(training_args, "write_param_checksums", False):
        callbacks.append(ParamChecksumCallback())
    return TensorAttnTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=answer_metrics if answer_accuracy_metric else None,
        preprocess_logits_for_metrics=argmax_logits if answer_accuracy_metric else None,
        callbacks=callbacks,
    )


def build_trainer(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TensorAttnTrainingArguments,
    callbacks: list[TrainerCallback] = (),
) -> Trainer:
    """Tokenizer, datasets, model and `Trainer` of the run arguments; nothing is trained or written yet."""
    check_run(data_args, training_args)
    tokenizer = build_tokenizer(model_args)
    # The main process fills datasets' cache first; the others then read it instead of writing it again.
    with training_args.main_process_first(desc="building the datasets"):
        train_dataset, eval_dataset = build_datasets(data_args, tokenizer)
    set_seed(training_args.seed)
    model = build_model(model_args, tokenizer)
    return make_trainer(model, tokenizer, training_args, train_dataset, eval_dataset,
                        answer_accuracy_metric=data_args.task == "match3", callbacks=callbacks)


def run_trainer(trainer: Trainer, resume_from_checkpoint: str | bool | None = None) -> Trainer:
    """Train (resuming from a checkpoint path, or from the newest in output_dir when it is true or "true"), evaluate
    the final model unless its last step just did, and save the model, tokenizer and `trainer_state.json`."""
    if not isinstance(trainer, TensorAttnTrainer):  # ours checks in `train`
        weights_only = getattr(trainer.args, "resume_weights_only", False)
        resume_from_checkpoint = resolve_checkpoint(trainer.args.output_dir, resume_from_checkpoint, weights_only)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    final_step = trainer.state.global_step
    evaluated = any("eval_loss" in entry and entry.get("step") == final_step for entry in trainer.state.log_history)
    if trainer.eval_dataset is not None and not evaluated:
        trainer.evaluate()
    # The save swaps output_dir as a whole (hf_tensor_attn.atomic): every process must have written its files there
    # (ParamChecksumCallback) before the main process takes stock of them.
    trainer.accelerator.wait_for_everyone()
    trainer.save_model()
    trainer.save_state()
    return trainer


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TensorAttnTrainingArguments,
    callbacks: list[TrainerCallback] = (),
) -> Trainer:
    """Build, train, evaluate and save; also writes `run_config.json` (the arguments that differ from the defaults,
    itself a config file for `scripts/train.py`). Returns the trainer (`state.log_history` holds losses and metrics)."""
    trainer = run_trainer(build_trainer(model_args, data_args, training_args, callbacks),
                          training_args.resume_from_checkpoint)
    if trainer.is_world_process_zero():
        values = run_config(model_args, data_args, training_args)
        (Path(training_args.output_dir) / "run_config.json").write_text(json.dumps(values, indent=2) + "\n")
    return trainer


__all__ = [
    "ParamChecksumCallback",
    "TensorAttnTrainer",
    "build_datasets",
    "build_model",
    "build_tokenizer",
    "build_trainer",
    "make_trainer",
    "param_checksum",
    "resolve_checkpoint",
    "run_trainer",
    "train",
]
