"""The arguments of a training run: `ModelArguments`, `DataArguments` and `TensorAttnTrainingArguments`
(transformers' `TrainingArguments` plus one flag), read by transformers' `HfArgumentParser`.

A run config is one flat JSON or YAML object whose keys are fields of these dataclasses:

    {"hidden_size": 64, "layer_types": ["tensor_attention"], "task": "match3", "modulus": 16,
     "output_dir": "runs/match3", "max_steps": 1000, "learning_rate": 0.003}

`parse_args(["config.json", "--max_steps", "30", "--bf16=true"])` reads the file, then the command-line overrides
(the later value wins). The file's values go through the same argparse parser as the command line, so both are
checked alike; unknown keys, ill-typed values and options that the chosen task or model would not use raise
`ValueError` naming the key, the value and what is allowed, before anything is built or written.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import yaml
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import HfArgumentParser, TrainingArguments

from .configuration import TensorAttnConfig
from .data import Match3Task, check_text_files

Task = Literal["match3", "text"]
TASKS = typing.get_args(Task)
MATCH3_FIELDS = ("modulus", "length", "positive_rate", "num_train_examples", "num_eval_examples", "task_seed")
TEXT_FIELDS = ("train_files", "eval_files", "dataset_name", "dataset_config_name", "train_split", "eval_split",
               "text_column", "block_size", "streaming", "num_proc")
DATASET_NAME_FIELDS = ("dataset_config_name", "train_split", "eval_split")
LORA_OPTIONS = ("lora_alpha", "lora_dropout", "lora_target_modules")
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
USAGE = "train.py [CONFIG.json | CONFIG.yaml] [--key value | --key=value ...]"


def _changed(arguments, names: Sequence[str]) -> dict[str, Any]:
    """The fields among `names` whose value differs from the field's default."""
    fields = {f.name: f for f in dataclasses.fields(arguments)}
    changed = {}
    for name in names:
        spec = fields[name]
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        if getattr(arguments, name) != default:
            changed[name] = getattr(arguments, name)
    return changed


def _config_field_help() -> dict[str, str]:
    """Each field's description from TensorAttnConfig's docstring: `name (`type`, ...): text` and its continuation."""
    descriptions, name = {}, None
    for line in TensorAttnConfig.__doc__.splitlines():
        match = re.match(r" {8}(\w+) \(`[^`]*`[^)]*\): (.*)", line)
        if match:
            name = match[1]
            descriptions[name] = match[2]
        elif name and line.startswith(" " * 12):
            descriptions[name] += " " + line.strip()
        else:
            name = None
    return descriptions


def _config_value_types() -> dict[str, type]:
    """TensorAttnConfig's own fields that are not also TrainingArguments fields, each with its (first) value type."""
    # Only the class's own annotations: its transformers base annotates with names that resolve only there.
    own = type("TensorAttnConfigFields", (), {"__annotations__": TensorAttnConfig.__dict__["__annotations__"],
                                              "__module__": TensorAttnConfig.__module__})
    # `use_cache` is also a TrainingArguments field, the one Trainer applies to the model during training.
    training_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {name: ([arg for arg in typing.get_args(annotation) if arg is not type(None)] or [annotation])[0]
            for name, annotation in typing.get_type_hints(own).items() if name not in training_fields}


def _config_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    """TensorAttnConfig's own fields as optional arguments of one type each (argparse takes one); unset keeps the
    config's default."""
    descriptions = _config_field_help()
    fields = []
    for name, value_type in _config_value_types().items():
        value_types = [value_type]
        text = descriptions.get(name, f"TensorAttnConfig.{name}").replace("%", "%%")
        help_text = f"model config (unset: the config's default): {text}"
        if value_types[0] is dict:
            # Nested settings (rope_parameters) are a JSON object on the command line, a mapping in a config file.
            value_types, help_text = [str], f"{help_text} Given as a JSON object."
        fields.append((name, value_types[0] | None, field(default=None, metadata={"help": help_text})))
    return fields


ModelConfigArguments = dataclasses.make_dataclass("ModelConfigArguments", _config_fields())
# The config's dict fields, read from JSON text (`ModelArguments.__post_init__`).
JSON_CONFIG_FIELDS = tuple(name for name, value_type in _config_value_types().items() if value_type is dict)


def check_pretrained_source(argument: str, value: str) -> None:
    """A local folder that exists, or a Hub repo id ("name" or "org/name"); else ValueError naming both choices.
    Without this, a mistyped path reaches the Hub client, which complains about repo id characters."""
    if Path(value).expanduser().is_dir():
        return
    try:
        validate_repo_id(value)  # refuses what only a path can be: leading / . ~, two slashes, backslashes
    except HFValidationError:
        raise ValueError(f"`{argument}` {value!r} is no existing folder (nor a Hub repo id 'org/name'); give the folder a "
                         "model was saved to (save_pretrained, or a run's output_dir) or a Hub repo id") from None


@dataclass
class ModelArguments(ModelConfigArguments):
    """The model: a fresh one from the `TensorAttnConfig` fields given, or the pretrained `init_from` with those
    fields as config overrides; with `lora_r`, only LoRA adapters (peft) are trained."""

    init_from: str | None = field(
        default=None, metadata={"help": "path or name of a pretrained model to fine-tune; model config fields given "
                                        "then override its config"})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "tokenizer name or path for AutoTokenizer (default: init_from's own, else "
                                        "the byte tokenizer); the vocabulary and special ids of a fresh model follow it"})
    lora_r: int | None = field(
        default=None, metadata={"help": "rank of LoRA adapters: train only adapters on lora_target_modules (peft)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (with lora_r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA path (with lora_r)"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "modules that get adapters (with lora_r); the attention projections of tensor and "
                          "standard layers alike"})

    def __post_init__(self):
        for name in JSON_CONFIG_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    value = None
                if not isinstance(value, dict):
                    raise ValueError(f"`{name}` must be a JSON object such as "
                                     f"'{{\"rope_type\": \"linear\", \"factor\": 2.0}}', got {getattr(self, name)!r}")
                setattr(self, name, value)
        lora_options = _changed(self, LORA_OPTIONS)
        if self.lora_r is None and lora_options:
            raise ValueError(f"LoRA options {lora_options} given without `lora_r`; set lora_r (the adapter rank) "
                             "to fine-tune with LoRA")
        if self.lora_r is not None and self.lora_r < 1:
            raise ValueError(f"`lora_r` must be an int >= 1, got {self.lora_r!r}")
        if self.init_from is None:
            # Its strict validators name the field, value and allowed; a copy, since the base config fills
            # rope_parameters in place.
            TensorAttnConfig(**copy.deepcopy(self.config_overrides()))
        else:
            check_pretrained_source("init_from", self.init_from)
        if self.tokenizer_name is not None:
            check_pretrained_source("tokenizer_name", self.tokenizer_name)

    def config_overrides(self) -> dict[str, Any]:
        """The model config fields that were given."""
        names = [f.name for f in dataclasses.fields(ModelConfigArguments)]
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class DataArguments:
    """What the model trains on: the synthetic Match3 task (`hf_tensor_attn.data`), or text from local files or a
    `datasets` dataset, cut into blocks of `block_size` tokens."""

    task: Task = field(default="match3", metadata={"help": "the training data"})
    modulus: int = field(default=16, metadata={"help": "match3: numbers lie in [0, modulus)"})
    length: int = field(default=16, metadata={"help": "match3: numbers per sequence"})
    positive_rate: float = field(default=0.5, metadata={"help": "match3: chance a position is drawn positive"})
    num_train_examples: int = field(default=20000, metadata={"help": "match3: training sequences"})
    num_eval_examples: int = field(default=1000, metadata={"help": "match3: held-out sequences"})
    task_seed: int = field(default=0, metadata={"help": "match3: seed of the training sequences (held-out ones: "
                                                        "task_seed + 1000003)"})
    train_files: list[str] | None = field(
        default=None, metadata={"help": "text: local files of one format, by extension: .txt (a file is one "
                                        "document), .json / .jsonl, .csv, .parquet (a record is one document)"})
    eval_files: list[str] | None = field(default=None, metadata={"help": "text: held-out files, as train_files"})
    dataset_name: str | None = field(
        default=None, metadata={"help": "text: a dataset for datasets.load_dataset (hub name or local directory), "
                                        "instead of train_files"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "text: configuration of dataset_name"})
    train_split: str = field(default="train", metadata={"help": "text: training split of dataset_name"})
    eval_split: str | None = field(default=None, metadata={"help": "text: held-out split of dataset_name"})
    text_column: str = field(default="text", metadata={"help": "text: the column holding the text (json, csv, "
                                                               "parquet, dataset_name)"})
    block_size: int = field(default=128, metadata={"help": "text: tokens per training sequence"})
    streaming: bool = field(default=False, metadata={"help": "text: read and tokenize the data as training goes "
                                                             "(an IterableDataset; needs max_steps)"})
    num_proc: int | None = field(default=None, metadata={"help": "text: processes that load and tokenize the "
                                                                 "data (not with streaming)"})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"`task` must be one of {list(TASKS)}, got {self.task!r}")
        unused = _changed(self, TEXT_FIELDS if self.task == "match3" else MATCH3_FIELDS)
        if unused:
            allowed = MATCH3_FIELDS if self.task == "match3" else TEXT_FIELDS
            raise ValueError(f"task {self.task!r} does not use {unused}; allowed for it: {list(allowed)}")
        if self.task == "match3":
            self._check_match3()
        else:
            self._check_text()

    def _check_match3(self) -> None:
        for name in ("num_train_examples", "num_eval_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {getattr(self, name)!r}")
        Match3Task(self.modulus, self.length, 1, self.task_seed, self.positive_rate)  # checks the other settings

    def _check_text(self) -> None:
        if (self.train_files is None) == (self.dataset_name is None):
            raise ValueError(f"task 'text' reads `train_files` (local files) or `dataset_name` (datasets.load_dataset): "
                             f"give exactly one, got train_files={self.train_files!r}, dataset_name={self.dataset_name!r}")
        named_only = _changed(self, DATASET_NAME_FIELDS)
        if self.train_files is not None and named_only:
            raise ValueError(f"{named_only} apply to `dataset_name`, not to `train_files`; held-out files go in "
                             "`eval_files`")
        for argument in ("train_files", "eval_files"):
            if getattr(self, argument) is not None:
                check_text_files(getattr(self, argument), argument)
        if self.dataset_name is not None and self.eval_files is not None:
            raise ValueError(f"`eval_files` {self.eval_files!r} apply to `train_files`; with `dataset_name` give "
                             "`eval_split`")
        if self.block_size < 2:
            raise ValueError(f"`block_size` must be an int >= 2, got {self.block_size!r}")
        if self.num_proc is not None and (self.num_proc < 1 or self.streaming):
            raise ValueError(f"`num_proc` must be an int >= 1 and cannot go with `streaming` (a streamed dataset is "
                             f"tokenized as it is read), got num_proc={self.num_proc!r}, streaming={self.streaming}")

    @property
    def has_eval_data(self) -> bool:
        return self.task == "match3" or self.eval_files is not None or self.eval_split is not None


@dataclass
class TensorAttnTrainingArguments(TrainingArguments):
    """transformers' `TrainingArguments`, plus `write_param_checksums`. A `resume_from_checkpoint` of "true" resumes
    from the newest checkpoint in output_dir (as `Trainer.train(resume_from_checkpoint=True)` does)."""

    resume_weights_only: bool = field(
        default=False, metadata={"help": "allow resuming from a checkpoint without optimizer.pt or scheduler.pt: "
                                         "its weights and step are restored, the optimizer and schedule start "
                                         "afresh (the run then differs from an uninterrupted one)"})
    write_param_checksums: bool = field(
        default=False, metadata={"help": "at the end, write a sha256 of each process's parameters to "
                                         "output_dir/param_checksums/rank{R}.json (DDP ranks must agree)"})

    def __post_init__(self):
        if self.fp16:
            raise ValueError("`fp16` true is not supported: use `bf16` true, or float32 (both false)")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or (
            self.max_steps < 1 and self.max_steps != -1
        ):
            # TrainingArguments treats every max_steps <= 0 as "not set" and trains num_train_epochs epochs.
            raise ValueError(f"`max_steps` must be an int >= 1, or -1 (the default: train num_train_epochs epochs), "
                             f"got {self.max_steps!r}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1 (sequences per device and step), got {value!r}")
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"`learning_rate` must be a finite float >= 0, got {lr!r}")
        if self.output_dir is not None and Path(self.output_dir).expanduser().exists() and not Path(
            self.output_dir
        ).expanduser().is_dir():
            raise ValueError(f"`output_dir` {self.output_dir!r} is an existing file, not a folder; give a folder path "
                             "(it is created if missing)")
        if not self.use_cpu and not torch.accelerator.is_available():
            # TrainingArguments refuses bf16 without an accelerator unless told that the run is on the CPU, which
            # is where it runs anyway.
            self.use_cpu = True
        super().__post_init__()


def check_run(data_args: DataArguments, training_args: TrainingArguments) -> None:
    """What no single group of arguments can check alone."""
    if data_args.streaming and training_args.max_steps <= 0:
        raise ValueError(f"`streaming` needs `max_steps` > 0 (a streamed dataset has no length to count epochs "
                         f"by), got max_steps={training_args.max_steps}")
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    if strategy != "no" and not data_args.has_eval_data:
        raise ValueError(f"`eval_strategy` {strategy!r} needs held-out data: give `eval_files` (or `eval_split` with "
                         "`dataset_name`), or set eval_strategy to 'no'")


class _ArgumentParser(HfArgumentParser):
    def error(self, message):
        # Python callers (tests, scripts) get a ValueError; scripts/train.py prints it and exits with status 2.
        raise ValueError(message)


def make_parser() -> HfArgumentParser:
    return _ArgumentParser((ModelArguments, DataArguments, TensorAttnTrainingArguments), prog="train.py",
                           usage=USAGE, description=__doc__.split("\n\n")[0], allow_abbrev=False)


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.suffix.lower() not in CONFIG_SUFFIXES:
        raise ValueError(f"config file {str(path)!r} must end in one of {list(CONFIG_SUFFIXES)}")
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"config file {str(path)!r} does not parse: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold one object of `key: value` pairs, got {values!r}")
    return values


def _options(parser: HfArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.option_strings}


def _unknown(what: str, keys: Sequence[str], parser: HfArgumentParser) -> ValueError:
    """The error for unknown keys, with the closest known key of each: "(did you mean 'max_steps' for 'max_step'?)"."""
    guesses = {key: difflib.get_close_matches(key, list(_options(parser)), n=1) for key in keys}
    hints = ", ".join(f"{guess[0]!r} for {key!r}" for key, guess in guesses.items() if guess)
    return ValueError(f"{what}{f' (did you mean {hints}?)' if hints else ''}; allowed keys: the fields of "
                      "ModelArguments, DataArguments and TrainingArguments that `train.py --help` lists, each given as "
                      "`--key value` or `--key=value`")


def _as_command_line(key: str, value: Any, option: argparse.Action) -> list[str]:
    if isinstance(value, list) and option.nargs == "+":
        return [f"--{key}", *map(str, value)]
    if isinstance(value, (dict, list)):
        return [f"--{key}={json.dumps(value)}"]
    if isinstance(value, bool):
        return [f"--{key}={str(value).lower()}"]
    return [f"--{key}={value}"]


def config_file_args(parser: HfArgumentParser, path: str | Path) -> list[str]:
    """A config file's values as command-line arguments, so that argparse checks them as it checks the command line."""
    values = read_config_file(path)
    options = _options(parser)
    unknown = sorted(set(values) - set(options))
    if unknown:
        raise _unknown(f"config file {str(path)!r}: unknown keys {unknown}", unknown, parser)
    args = []
    for key, value in values.items():
        if value is None and options[key].default is not None:
            raise ValueError(f"config file {str(path)!r}: `{key}` is null, allowed only where the default is null; "
                             f"give a value (default {options[key].default!r}) or leave the key out")
        if value is not None:
            args += _as_command_line(key, value, options[key])
    return args


def parse_args(
    argv: Sequence[str | Path],
) -> tuple[ModelArguments, DataArguments, TensorAttnTrainingArguments]:
    """`[CONFIG] [--key value | --key=value ...]`: a JSON / YAML config file's values, then the overrides."""
    argv = [str(arg) for arg in argv]
    parser = make_parser()
    file_args = []
    if argv and not argv[0].startswith("-"):
        file_args, argv = config_file_args(parser, argv[0]), argv[1:]
    *arguments, unknown = parser.parse_args_into_dataclasses(
        args=[*file_args, *argv], return_remaining_strings=True, look_for_args_file=False)
    if unknown:
        keys = [arg[2:].split("=")[0] for arg in unknown if arg.startswith("--")]
        raise _unknown(f"unknown arguments {unknown}", keys, parser)
    model_args, data_args, training_args = arguments
    check_run(data_args, training_args)
    return model_args, data_args, training_args


def run_config(*arguments) -> dict[str, Any]:
    """The values that differ from each dataclass's defaults: a config file that `parse_args` reads back to the same
    arguments (what a run writes to output_dir/run_config.json)."""
    values = {}
    for group in arguments:
        if isinstance(group, TrainingArguments):
            # The default output_dir, named: left unset it is filled in with a log message.
            reference = type(group)(output_dir="trainer_output").to_dict()
            given = group.to_dict()
        else:
            reference, given = dataclasses.asdict(type(group)()), dataclasses.asdict(group)
        values.update({key: value for key, value in given.items() if reference.get(key) != value})
    return values


__all__ = [
    "DataArguments",
    "ModelArguments",
    "TensorAttnTrainingArguments",
    "check_run",
    "make_parser",
    "parse_args",
    "read_config_file",
    "run_config",
]
