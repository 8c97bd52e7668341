"""Config-driven training on transformers' `Trainer`: what `scripts/train.py` runs, importable for tests and scripts.

A run config is a JSON object with three sections and two script options:

    {
      "model":    {TensorAttnConfig fields: hidden_size, num_hidden_layers, layer_types, ...},
      "task":     {"task": "match3" | "text", and that task's keys (see MATCH3_KEYS / TEXT_KEYS)},
      "training": {transformers.TrainingArguments fields: output_dir, max_steps, learning_rate, bf16, ...},
      "resume_from_checkpoint": null | true | "path/to/checkpoint-N",
      "write_param_checksums": false,
      "init_from": null | "path/or/name of a pretrained model to fine-tune",
      "lora": null | {peft.LoraConfig fields, e.g. "r": 8, "lora_alpha": 16, "target_modules": [...]}
    }

Without `init_from` the model is freshly initialised from the "model" section; with it, the "model" section holds
config overrides passed to `from_pretrained` (e.g. dropout). With `lora`, only LoRA adapters on the attention
projections (q_proj, k_proj, v_proj, o_proj unless `target_modules` says otherwise) are trained, and output_dir
receives the adapter (peft's format, which `AutoModelForCausalLM.from_pretrained` also loads).

Command-line overrides `--key=value` name a key either plainly (`--max_steps=30`), which must belong to exactly
one section, or with its section (`--model.hidden_size=128`). Values are parsed as JSON when they parse
(`30`, `true`, `null`, `["a.txt"]`) and kept as strings otherwise. Unknown keys and ill-typed or out-of-range
values raise `ValueError` naming the key, the value and what is allowed, before anything is built or written.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from .configuration import TensorAttnConfig
from .data import Match3Task, answer_accuracy, text_dataset
from .tokenization import TensorAttnByteTokenizer

TASKS = ("match3", "text")
MATCH3_KEYS = {
    "modulus": 16,
    "length": 16,
    "positive_rate": 0.5,
    "num_train_examples": 20000,
    "num_eval_examples": 1000,
    "task_seed": 0,
}
TEXT_KEYS = {
    "train_files": None,
    "eval_files": None,
    "text_format": "text",
    "text_field": "text",
    "tokenizer": None,
    "block_size": 128,
}
TEXT_FORMATS = ("text", "json")
# Held-out Match3 data comes from a seed no training seed reaches by `task_seed + small int`.
EVAL_SEED_OFFSET = 1_000_003
SCRIPT_KEYS = {"resume_from_checkpoint": None, "write_param_checksums": False, "init_from": None, "lora": None}
LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(TensorAttnConfig))
# `resume_from_checkpoint` is a TrainingArguments field that Trainer itself ignores; the script key of that name
# is what resumes, so the training section does not offer it.
TRAINING_FIELDS = {
    f.name: f for f in dataclasses.fields(TrainingArguments) if f.init and f.name not in ("resume_from_checkpoint",)
}
# What a run sets unless its config says otherwise: no experiment trackers, evaluation on the eval split.
TRAINING_DEFAULTS = {"report_to": "none", "eval_strategy": "steps", "save_total_limit": 2}
SECTIONS = ("model", "task", "training")


@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    resume_from_checkpoint: bool | str | None = None
    write_param_checksums: bool = False
    init_from: str | None = None
    lora: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------- config


def _task_keys(task_name: str) -> dict[str, Any]:
    return MATCH3_KEYS if task_name == "match3" else TEXT_KEYS


def _section_of(key: str, value: Any) -> str:
    """The one section a plain `--key=value` override belongs to."""
    owners = []
    if key in MODEL_KEYS:
        owners.append("model")
    if key == "task" or key in MATCH3_KEYS or key in TEXT_KEYS:
        owners.append("task")
    if key in TRAINING_FIELDS:
        owners.append("training")
    if key in SCRIPT_KEYS:
        owners.append("script")
    if not owners:
        raise ValueError(
            f"unknown config key {key!r} (value {value!r}); allowed: TensorAttnConfig fields (section 'model'), "
            f"task keys {['task', *MATCH3_KEYS, *TEXT_KEYS]} (section 'task'), TrainingArguments fields "
            f"(section 'training'), or {list(SCRIPT_KEYS)}"
        )
    if len(owners) > 1:
        raise ValueError(
            f"config key {key!r} (value {value!r}) belongs to sections {owners}; name it as SECTION.{key}, "
            f"e.g. --{owners[0]}.{key}={value!r}"
        )
    return owners[0]


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """`--key=value` / `--section.key=value` arguments applied to a copy of `config`."""
    config = copy.deepcopy(config)
    for arg in overrides:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"override {arg!r} must look like --key=value (e.g. --max_steps=30)")
        key, text = arg[2:].split("=", 1)
        value = parse_value(text)
        if "." in key:
            section, key = key.split(".", 1)
            if section not in SECTIONS:
                raise ValueError(f"override {arg!r}: unknown section {section!r}; allowed: {list(SECTIONS)}")
        else:
            section = _section_of(key, value)
        if section == "script":
            setattr(config, key, value)
        else:
            getattr(config, section)[key] = value
    return config


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Read a JSON run config, apply overrides, validate everything; raises `ValueError` on any bad key or value."""
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"config {str(path)!r} is not valid JSON: {e}") from e
    return validate(config_from_dict(raw, source=str(path)), overrides)


def config_from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"{source} must be a JSON object, got {type(raw).__name__}")
    allowed = [*SECTIONS, *SCRIPT_KEYS]
    unknown = {k: raw[k] for k in sorted(set(raw) - set(allowed))}
    if unknown:
        raise ValueError(f"{source}: unknown top-level keys {unknown}; allowed: {allowed}")
    for section in SECTIONS:
        if not isinstance(raw.get(section, {}), dict):
            raise ValueError(f"{source}: section {section!r} must be an object, got {raw[section]!r}")
    return RunConfig(**copy.deepcopy(raw))


def validate(config: RunConfig, overrides: list[str] = ()) -> RunConfig:
    config = apply_overrides(config, list(overrides))
    _validate_task(config.task)
    _validate_training(config.training)
    _validate_model(config.model, fine_tuning=config.init_from is not None)
    value = config.resume_from_checkpoint
    if not (value is None or isinstance(value, (bool, str))):
        raise ValueError(
            f"`resume_from_checkpoint` must be null, true (latest checkpoint in output_dir) or a checkpoint path, got {value!r}"
        )
    if not isinstance(config.write_param_checksums, bool):
        raise ValueError(f"`write_param_checksums` must be true or false, got {config.write_param_checksums!r}")
    if config.init_from is not None and not isinstance(config.init_from, str):
        raise ValueError(f"`init_from` must be null or a model path/name, got {config.init_from!r}")
    if config.lora is not None:
        config.lora = _validate_lora(config.lora)
    return config


def _validate_lora(lora: Any) -> dict[str, Any]:
    if not isinstance(lora, dict):
        raise ValueError(f"`lora` must be null or an object of peft.LoraConfig fields, got {lora!r}")
    from peft import LoraConfig

    allowed = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    unknown = {k: lora[k] for k in sorted(set(lora) - allowed)}
    if unknown:
        raise ValueError(f"`lora` has unknown keys {unknown}; allowed: peft.LoraConfig fields, e.g. {list(LORA_DEFAULTS)}")
    lora = {**LORA_DEFAULTS, **lora}
    r = lora["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"`lora.r` must be an int >= 1, got {r!r}")
    LoraConfig(**lora)  # peft's own checks on the remaining fields
    return lora


def _validate_task(task: dict[str, Any]) -> None:
    name = task.setdefault("task", "match3")
    if name not in TASKS:
        raise ValueError(f"task key `task` must be one of {list(TASKS)}, got {name!r}")
    keys = _task_keys(name)
    unknown = {k: task[k] for k in sorted(set(task) - set(keys) - {"task"})}
    if unknown:
        raise ValueError(f"task {name!r} has no keys {unknown}; allowed: {['task', *keys]}")
    for key, default in keys.items():
        task.setdefault(key, default)
    if name == "match3":
        for key in ("num_train_examples", "num_eval_examples"):
            value = task[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"task key `{key}` must be an int >= 1, got {value!r}")
        # Match3Task checks modulus, length, seed and positive_rate with the same error style.
        Match3Task(task["modulus"], task["length"], 1, task["task_seed"], task["positive_rate"])
        return
    for key in ("train_files", "eval_files"):
        value = task[key]
        if value is None and key == "eval_files":
            continue  # no evaluation
        files = [value] if isinstance(value, str) else value
        if not (isinstance(files, list) and files and all(isinstance(p, str) for p in files)):
            raise ValueError(f"task key `{key}` must be a path or a non-empty list of paths, got {value!r}")
        missing = [p for p in files if not os.path.exists(p)]
        if missing:
            raise ValueError(f"task key `{key}` names files that do not exist: {missing}")
    if task["text_format"] not in TEXT_FORMATS:
        raise ValueError(f"task key `text_format` must be one of {list(TEXT_FORMATS)}, got {task['text_format']!r}")
    block = task["block_size"]
    if isinstance(block, bool) or not isinstance(block, int) or block < 2:
        raise ValueError(f"task key `block_size` must be an int >= 2, got {block!r}")
    if task["tokenizer"] is not None and not isinstance(task["tokenizer"], str):
        raise ValueError(f"task key `tokenizer` must be null (the byte tokenizer) or a name/path, got {task['tokenizer']!r}")


def _matches(value: Any, annotation: Any) -> bool:
    """Whether a JSON value fits a TrainingArguments field annotation (scalars, enums, unions, lists, dicts)."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in {m.value for m in annotation}
    if origin is list or annotation is list:
        args = typing.get_args(annotation)
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True  # an annotation we do not model: TrainingArguments checks it itself


def _describe(annotation: Any) -> str:
    """Allowed values of an annotation, enums spelled out (a `SchedulerType | str` field takes only the enum's values)."""
    args = typing.get_args(annotation)
    enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
    if enums:
        return f"one of {[m.value for m in enums[0]]}"
    return getattr(annotation, "__name__", None) or str(annotation)


def _validate_training(training: dict[str, Any]) -> None:
    for key, default in TRAINING_DEFAULTS.items():
        training.setdefault(key, default)
    unknown = {k: training[k] for k in sorted(set(training) - set(TRAINING_FIELDS))}
    if unknown:
        raise ValueError(
            f"training section has unknown keys {unknown}; allowed: transformers.TrainingArguments fields, e.g. "
            "output_dir, max_steps, learning_rate, per_device_train_batch_size, lr_scheduler_type, optim, bf16, "
            "gradient_checkpointing, eval_steps, save_steps, logging_steps"
        )
    if "output_dir" not in training:
        raise ValueError("training key `output_dir` is required (give it in the config or as --output_dir=DIR)")
    for key, value in training.items():
        annotation = TRAINING_FIELDS[key].type
        # An enum-or-str field accepts any str as far as its annotation says; its enum is the real contract.
        args = typing.get_args(annotation)
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        ok = value in {m.value for m in enums[0]} if enums and isinstance(value, str) else _matches(value, annotation)
        if not ok:
            raise ValueError(f"training key `{key}` got {value!r}; allowed: {_describe(annotation)}")
    if training.get("bf16") and training.get("fp16"):
        raise ValueError("training keys `bf16` and `fp16` are both true; choose one precision")
    if training.get("fp16"):
        raise ValueError("training key `fp16` is not supported: use `bf16: true` or float32 (both false)")


def _validate_model(model: dict[str, Any], fine_tuning: bool) -> None:
    unknown = {k: model[k] for k in sorted(set(model) - set(MODEL_KEYS))}
    if unknown:
        raise ValueError(f"model section has unknown keys {unknown}; allowed: TensorAttnConfig fields {sorted(MODEL_KEYS)}")
    if not fine_tuning:  # overrides of a pretrained config are checked when from_pretrained applies them
        TensorAttnConfig(**model)  # its strict validators name the field, the value and what is allowed


# ---------------------------------------------------------------------------------------------------- building


def build_tokenizer(task: dict[str, Any], init_from: str | None = None):
    """The task's named tokenizer; else the pretrained model's own when fine-tuning one; else the byte tokenizer."""
    name = task.get("tokenizer")
    if name is not None:
        return AutoTokenizer.from_pretrained(name)
    if init_from is not None:
        try:
            return AutoTokenizer.from_pretrained(init_from)
        except (OSError, ValueError):
            pass  # a model saved without a tokenizer: fall back to the byte tokenizer it was most likely trained with
    return TensorAttnByteTokenizer()


def build_datasets(task: dict[str, Any], tokenizer) -> tuple[Any, Any | None]:
    if task["task"] == "match3":
        common = dict(modulus=task["modulus"], length=task["length"], positive_rate=task["positive_rate"])
        train = Match3Task(num_examples=task["num_train_examples"], seed=task["task_seed"], **common).build()
        held_out = Match3Task(num_examples=task["num_eval_examples"], seed=task["task_seed"] + EVAL_SEED_OFFSET, **common)
        return train, held_out.build()
    kwargs = dict(tokenizer=tokenizer, block_size=task["block_size"], text_format=task["text_format"],
                  text_field=task["text_field"])
    train = text_dataset(task["train_files"], **kwargs)
    evaluation = text_dataset(task["eval_files"], **kwargs) if task["eval_files"] else None
    return train, evaluation


def build_model(model: dict[str, Any], tokenizer, seed: int, init_from: str | None = None, lora: dict | None = None):
    """A freshly initialised model (a tokenizer other than the byte tokenizer sets vocab size and special ids), or
    the pretrained `init_from` with `model` as config overrides; wrapped with LoRA adapters when `lora` is given."""
    torch.manual_seed(seed)
    if init_from is not None:
        net = AutoModelForCausalLM.from_pretrained(init_from, **model)
    else:
        net = _fresh_model(model, tokenizer)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(task_type="CAUSAL_LM", **lora))
    return net


def _fresh_model(model: dict[str, Any], tokenizer):
    kwargs = dict(model)
    if not isinstance(tokenizer, TensorAttnByteTokenizer):
        kwargs.setdefault("vocab_size", len(tokenizer))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            kwargs.setdefault(name, getattr(tokenizer, name))
    config = AutoConfig.for_model("tensor_attn", **kwargs)
    return AutoModelForCausalLM.from_config(config)


def answer_metrics(eval_pred) -> dict[str, float]:
    """Accuracy over answer tokens (labels != -100): the next-token prediction at each scored position."""
    return {"accuracy": answer_accuracy(eval_pred.predictions, eval_pred.label_ids)}


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


def build_trainer(config: RunConfig, callbacks: list[TrainerCallback] = ()) -> Trainer:
    """Tokenizer, datasets, model and `Trainer` of a validated config; nothing is trained or written yet."""
    tokenizer = build_tokenizer(config.task, config.init_from)
    train, evaluation = build_datasets(config.task, tokenizer)
    training = dict(config.training)
    if evaluation is None:
        training["eval_strategy"] = "no"
    if "use_cpu" not in training and not torch.accelerator.is_available():
        # TrainingArguments refuses bf16 on a machine without an accelerator unless told the run is on CPU.
        training["use_cpu"] = True
    args = TrainingArguments(**training)
    model = build_model(config.model, tokenizer, seed=args.seed, init_from=config.init_from, lora=config.lora)
    is_match3 = config.task["task"] == "match3"
    callbacks = list(callbacks)
    if config.write_param_checksums:
        callbacks.append(ParamChecksumCallback())
    return Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=answer_metrics if is_match3 else None,
        preprocess_logits_for_metrics=argmax_logits if is_match3 else None,
        callbacks=callbacks,
    )


def train(config: RunConfig, callbacks: list[TrainerCallback] = ()) -> Trainer:
    """Train, evaluate, and write the final model, tokenizer, `trainer_state.json` and `run_config.json` to
    output_dir. Returns the trainer (its `state.log_history` holds the losses and eval metrics)."""
    trainer = build_trainer(config, callbacks)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint or None)
    final_step = trainer.state.global_step
    evaluated = any("eval_loss" in h and h.get("step") == final_step for h in trainer.state.log_history)
    if trainer.eval_dataset is not None and not evaluated:
        trainer.evaluate()  # the final model's held-out metrics, unless the last step already logged them
    trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero():
        path = Path(trainer.args.output_dir) / "run_config.json"
        path.write_text(json.dumps(config.to_dict(), indent=2, default=str))
    return trainer


# ---------------------------------------------------------------------------------------------------- launching


_RANK_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def requested_cpu_processes() -> int:
    """How many CPU processes `accelerate launch --cpu --num_processes N` asked for when it started only this one.

    accelerate's launcher runs several CPU processes only through `mpirun` (with `--mpirun_hostfile`); otherwise it
    starts a single process and exports MASTER_ADDR / MASTER_PORT (only when N > 1), but neither N nor a rank. So
    when this process has no rank, runs under `ACCELERATE_USE_CPU`, and has a master address, N is read from the
    launcher's own command line (the parent process). Returns 1 whenever that does not apply.
    """
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes") or "MASTER_ADDR" not in env:
        return 1
    if any(name in env for name in _RANK_ENV):
        return 1
    try:
        argv = [a.decode() for a in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return 1
    if "launch" in argv:
        launch_args = argv[argv.index("launch") + 1 :]
    elif "accelerate.commands.launch" in argv:
        launch_args = argv[argv.index("accelerate.commands.launch") + 1 :]
    else:
        return 1
    from accelerate.commands.launch import launch_command_parser

    try:
        parsed, _ = launch_command_parser().parse_known_args(launch_args)
    except SystemExit:
        return 1
    if not parsed.cpu or parsed.mpirun_hostfile is not None:
        return 1
    return parsed.num_processes or 1


def relaunch_cpu_ddp(script: str, args: list[str], num_processes: int) -> int:
    """Run `script args` as `num_processes` DDP workers over gloo through `torch.distributed.run`, on the master
    address accelerate exported; the workers inherit accelerate's environment (ACCELERATE_USE_CPU, threads)."""
    import subprocess
    import sys

    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(num_processes),
        "--master_addr", os.environ["MASTER_ADDR"],
        "--master_port", os.environ.get("MASTER_PORT", "29500"),
        script, *args,
    ]
    return subprocess.run(command, check=False).returncode


__all__ = [
    "RunConfig",
    "ParamChecksumCallback",
    "apply_overrides",
    "build_trainer",
    "config_from_dict",
    "load_config",
    "param_checksum",
    "relaunch_cpu_ddp",
    "requested_cpu_processes",
    "train",
    "validate",
]
