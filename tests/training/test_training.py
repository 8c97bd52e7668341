"""Training: Match3 and text data, run arguments, the Trainer run, resume, reload, LoRA."""

from __future__ import annotations

import importlib.util
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset, IterableDataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import hf_tensor_attn
from hf_tensor_attn.arguments import parse_args, run_config
from hf_tensor_attn.data import (
    IGNORE_INDEX,
    NEGATIVE_ID,
    POSITIVE_ID,
    Match3Task,
    match3_labels,
    number_token_id,
    text_dataset,
)
from hf_tensor_attn.tokenization import BOS_ID
from hf_tensor_attn.training import build_trainer, param_checksum, train

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "match3-tiny.json"
TEXT = ROOT / "configs" / "text-bytes.json"
QUIET = ["--disable_tqdm=true", "--logging_steps=2"]
# A 2-layer hybrid byte model on short blocks: seconds per run.
TINY_TEXT = ["--hidden_size=32", "--num_hidden_layers=2", "--layer_types", "full_attention", "tensor_attention",
             "--w1=8", "--w2=4", "--block_size=16", "--per_device_train_batch_size=4", "--save_strategy=no",
             "--learning_rate=0.003"]


def train_script():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def brute_force_match3(numbers, modulus):
    """Position i is positive iff some j1, j2 <= i (any, equal allowed) have x_i + x_j1 + x_j2 == 0 mod M."""
    return [
        any((numbers[i] + numbers[a] + numbers[b]) % modulus == 0 for a, b in itertools.product(range(i + 1), repeat=2))
        for i in range(len(numbers))
    ]


# ---------------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("modulus, length, rate", [(8, 12, 0.5), (16, 16, 0.5), (5, 7, 0.2), (12, 20, 0.9)])
def test_match3_labels_agree_with_brute_force(modulus, length, rate):
    task = Match3Task(modulus=modulus, length=length, num_examples=60, seed=3, positive_rate=rate)
    dataset = task.build()
    for row in dataset:
        numbers = row["numbers"]
        expected = brute_force_match3(numbers, modulus)
        assert [bool(a) for a in row["answers"]] == expected
        assert match3_labels(numbers, modulus) == expected
        answer_ids = [POSITIVE_ID if y else NEGATIVE_ID for y in expected]
        assert row["input_ids"] == [BOS_ID] + [t for x, a in zip(numbers, answer_ids) for t in (number_token_id(x), a)]
        # Loss only on answers: every label is -100 except at the answer tokens, which carry their own id.
        assert row["labels"] == [IGNORE_INDEX] + [t for a in answer_ids for t in (IGNORE_INDEX, a)]
        assert all(0 <= x < modulus for x in numbers)


def test_match3_is_seeded_balanced_and_readable():
    task = Match3Task(modulus=32, length=8, num_examples=400, seed=7)
    first, again = task.build(), task.build()
    assert first["input_ids"] == again["input_ids"]
    assert first["input_ids"] != Match3Task(modulus=32, length=8, num_examples=400, seed=8).build()["input_ids"]
    stats = task.describe(first)
    # With M = 32 and 8 numbers the prefix never saturates, so the drawn rate is the realised one.
    assert abs(stats["positive_rate"] - 0.5) < 0.05
    text = hf_tensor_attn.TensorAttnByteTokenizer().decode(first[0]["input_ids"])
    letters = "".join(chr(ord("A") + x) for x in first[0]["numbers"])
    assert text.startswith("<s>") and text[3::2] == letters and set(text[4::2]) <= {"+", "-"}


@pytest.mark.parametrize(
    "kwargs, name",
    [({"modulus": 0}, "modulus"), ({"modulus": 300}, "modulus"), ({"length": 0}, "length"),
     ({"positive_rate": 1.5}, "positive_rate"), ({"seed": -1}, "seed"), ({"num_examples": 2.5}, "num_examples")],
)
def test_match3_rejects_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Match3Task(**kwargs)


def test_text_dataset_chunks_local_files_with_any_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\nsecond line\n")
    (tmp_path / "b.txt").write_text("more text here")
    records = [{"body": "json record one"}, {"body": "two"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    byte_tok = hf_tensor_attn.TensorAttnByteTokenizer()

    blocks = text_dataset([tmp_path / "a.txt", tmp_path / "b.txt"], byte_tok, block_size=8)
    stream = [i for b in blocks["input_ids"] for i in b]
    expected = byte_tok("hello world\nsecond line\n", add_special_tokens=False).input_ids + [2]
    expected += byte_tok("more text here", add_special_tokens=False).input_ids + [2]
    assert stream == expected[: len(expected) // 8 * 8]
    assert blocks["labels"] == blocks["input_ids"] and all(len(b) == 8 for b in blocks["input_ids"])

    # A tokenizer named by path, as AutoTokenizer.from_pretrained(name) resolves it.
    byte_tok.save_pretrained(tmp_path / "tok")
    named = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    json_blocks = text_dataset(str(tmp_path / "c.jsonl"), named, block_size=4, text_column="body")
    decoded = named.decode([i for b in json_blocks["input_ids"] for i in b])
    assert decoded.startswith("json record one</s>two")

    with pytest.raises(ValueError, match="text_column"):
        text_dataset(str(tmp_path / "c.jsonl"), named, block_size=4, text_column="missing")
    with pytest.raises(ValueError, match="do not exist"):
        text_dataset(str(tmp_path / "nope.txt"), named)
    (tmp_path / "d.docx").write_text("not a format datasets reads")
    with pytest.raises(ValueError, match=r"d\.docx.*allowed.*\.parquet"):
        text_dataset(str(tmp_path / "d.docx"), named)


def test_text_dataset_streams_the_same_blocks(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\nsecond line\n" * 5)
    tokenizer = hf_tensor_attn.TensorAttnByteTokenizer()
    in_memory = text_dataset(tmp_path / "a.txt", tokenizer, block_size=8)
    streamed = text_dataset(tmp_path / "a.txt", tokenizer, block_size=8, streaming=True)
    assert isinstance(streamed, IterableDataset)
    assert [row["input_ids"] for row in streamed] == in_memory["input_ids"]


# ---------------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "override, names",
    [
        (["--not_a_key=1"], ("not_a_key", "allowed")),
        (["--lr_scheduler_type=sideways"], ("lr_scheduler_type", "sideways", "cosine")),
        (["--max_steps=ten"], ("max_steps", "ten", "int")),
        (["--modulus=0"], ("modulus", "0", "[1, 191]")),
        (["--task=poetry"], ("task", "poetry", "match3")),
        (["--hidden_size=-4"], ("hidden_size", "-4", "positive int")),
        (["--layer_types", "cross"], ("layer_types", "cross", "tensor_attention")),
        (["--block_size=64"], ("match3", "block_size", "allowed")),
        (["--lora_rank=4"], ("lora", "rank", "allowed")),
        (["--lora_alpha", "8"], ("lora_alpha", "8", "lora_r")),
        (["max_steps=3"], ("max_steps=3", "--key=value")),
        (["--bf16=maybe"], ("bf16", "maybe", "true/false")),
        (["--fp16=true"], ("fp16", "bf16")),
    ],
)
def test_bad_arguments_are_named(override, names):
    """Every error names the key, the value and what is allowed."""
    with pytest.raises(ValueError) as error:
        parse_args([TINY, *override])
    for name in names:
        assert name in str(error.value), (name, str(error.value))


def test_overrides_in_both_forms_reach_their_dataclasses():
    model_args, data_args, training_args = parse_args(
        [TINY, "--max_steps", "3", "--hidden_size=48", "--modulus", "5", "--output_dir=/tmp/x", "--bf16"])
    assert training_args.max_steps == 3 and training_args.output_dir == "/tmp/x" and training_args.bf16
    assert model_args.hidden_size == 48 and data_args.modulus == 5
    assert model_args.num_hidden_layers == 2 and training_args.learning_rate == 0.003  # from the file


def test_unknown_keys_are_rejected_naming_them(tmp_path):
    config = json.loads(TINY.read_text()) | {"learning_rat": 0.1}
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rat'\] \(did you mean 'learning_rate'"):
        parse_args([path])
    with pytest.raises(ValueError, match=r"unknown arguments \['--learning_rat', '0.1'\]"):
        parse_args([TINY, "--learning_rat", "0.1"])
    with pytest.raises(ValueError, match=r"unknown arguments \['--max_step', '5'\]"):
        parse_args([TINY, "--max_step", "5"])  # no abbreviations: a typo must not pass for a prefix


def test_yaml_config_equals_json_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(json.loads(TINY.read_text())))
    from_yaml, from_json = parse_args([path, "--max_steps=7"]), parse_args([TINY, "--max_steps=7"])
    assert from_yaml[:2] == from_json[:2] and from_yaml[2].to_dict() == from_json[2].to_dict()


def test_help_lists_the_fields(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_script().main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for key in ("--hidden_size", "--layer_types", "--init_from", "--lora_r", "--task", "--modulus", "--train_files",
                "--dataset_name", "--text_column", "--streaming", "--num_proc", "--max_steps", "--learning_rate",
                "--write_param_checksums"):
        assert key in text, key


@pytest.mark.parametrize("max_steps", [["--max_steps", "5"], ["--max_steps=5"]])
def test_train_script_takes_both_override_forms(tmp_path, max_steps):
    argv = [str(TINY), *QUIET, *max_steps, "--eval_strategy", "no", "--save_strategy=no", "--output_dir", str(tmp_path)]
    assert train_script().main(argv) == 0
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 5


def test_train_script_reports_bad_arguments(capsys):
    assert train_script().main([str(TINY), "--max_steps=ten"]) == 2
    assert "train.py: error: argument --max_steps/--max-steps: invalid int value: 'ten'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """16 steps of the tiny Match3 config with checkpoints at 8 and 16."""
    out = tmp_path_factory.mktemp("tiny_run")
    arguments = parse_args([TINY, *QUIET, "--max_steps=16", "--save_steps=8", "--eval_steps=8", f"--output_dir={out}"])
    trainer = train(*arguments)
    return arguments, trainer, out


def test_tiny_match3_run_lowers_loss_and_writes_state(tiny_run):
    _, trainer, out = tiny_run
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == 16 and len(losses) >= 4
    assert losses[-1] < losses[0] - 1.0, losses
    assert any("eval_accuracy" in h for h in state["log_history"])
    assert (out / "checkpoint-8").is_dir() and (out / "checkpoint-16").is_dir()
    assert json.loads((out / "run_config.json").read_text())["max_steps"] == 16


def test_run_config_reads_back_to_the_same_arguments(tiny_run):
    (model_args, data_args, training_args), _, out = tiny_run
    again = parse_args([out / "run_config.json"])
    assert again[:2] == (model_args, data_args)
    assert again[2].to_dict() == training_args.to_dict()
    assert run_config(*again) == json.loads((out / "run_config.json").read_text())


def test_saved_model_reloads_with_identical_logits(tiny_run):
    _, trainer, out = tiny_run
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(reloaded, hf_tensor_attn.TensorAttnForCausalLM)
    assert isinstance(tokenizer, hf_tensor_attn.TensorAttnByteTokenizerFast)  # transformers 5: AutoTokenizer is fast
    ids = torch.tensor(trainer.eval_dataset[:4]["input_ids"])
    trained = trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, trained(ids).logits)


def test_resume_from_checkpoint_continues_to_the_same_parameters(tiny_run, tmp_path):
    _, trainer, out = tiny_run
    # Only checkpoint-8 in a fresh output_dir: `true` must pick it up and train steps 9..16 again.
    shutil.copytree(out / "checkpoint-8", tmp_path / "checkpoint-8")
    resumed = parse_args([TINY, *QUIET, "--max_steps=16", "--save_steps=8", "--eval_steps=8",
                          f"--output_dir={tmp_path}", "--resume_from_checkpoint=true"])
    second = train(*resumed)
    steps = [h["step"] for h in second.state.log_history if "loss" in h]
    assert second.state.global_step == 16 and steps[0] <= 8 and steps[-1] == 16
    # Same data order, RNG and optimizer state as the uninterrupted run: the same parameters, bit for bit.
    assert param_checksum(second.model) == param_checksum(trainer.model)


def test_bf16_with_activation_checkpointing_trains(tmp_path):
    arguments = parse_args([TINY, *QUIET, "--max_steps=3", "--bf16=true", "--activation_checkpointing=true",
                            "--eval_strategy=no", "--save_strategy=no", "--logging_steps=1", f"--output_dir={tmp_path}"])
    trainer = train(*arguments)
    assert trainer.model.is_activation_checkpointing
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_text_run_trains_a_hybrid_byte_model(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a lazy dog sleeps while the quick fox runs. " * 10)
    arguments = parse_args([TEXT, *QUIET, *TINY_TEXT, "--train_files", corpus, f"--eval_files={held_out}",
                            "--block_size=32", "--max_steps=6", "--eval_steps=6", f"--output_dir={tmp_path / 'run'}"])
    trainer = train(*arguments)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert any("eval_loss" in h for h in trainer.state.log_history)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run").config.w1 == 8


def text_run(tmp_path, *argv):
    """Three steps of the tiny hybrid byte model on the given data, without evaluation."""
    arguments = parse_args([TEXT, *QUIET, *TINY_TEXT, "--max_steps=3", "--eval_strategy=no",
                            f"--output_dir={tmp_path / 'run'}", *argv])
    trainer = train(*arguments)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 3 and losses and all(np.isfinite(losses))
    return trainer


def first_block_text(trainer) -> str:
    return trainer.processing_class.decode(next(iter(trainer.train_dataset))["input_ids"])


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_csv_and_parquet_corpora_train(tmp_path, suffix):
    records = Dataset.from_dict({"id": [1, 2, 3], "body": ["a fox jumps over a dog. " * 8, "two " * 20, "three " * 20]})
    path = tmp_path / f"corpus.{suffix}"
    if suffix == "csv":
        records.to_csv(path)
    else:
        records.to_parquet(path)
    trainer = text_run(tmp_path, "--train_files", path, "--text_column=body", "--num_proc=2")
    assert first_block_text(trainer) == "a fox jumps over"


def test_streaming_run_trains_and_needs_max_steps(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"line {i} of a streamed corpus. "}) + "\n" for i in range(64)))
    trainer = text_run(tmp_path, "--train_files", corpus, "--streaming")
    assert isinstance(trainer.train_dataset, IterableDataset)
    assert first_block_text(trainer) == "line 0 of a stre"
    with pytest.raises(ValueError, match="streaming.*max_steps.*-1"):
        parse_args([TEXT, *TINY_TEXT, "--train_files", corpus, "--streaming", "--max_steps=-1"])


def test_dataset_name_reads_a_local_dataset_directory(tmp_path):
    directory = tmp_path / "my_dataset"
    directory.mkdir()
    Dataset.from_dict({"text": ["training text, training text. " * 4]}).to_json(directory / "train.jsonl")
    Dataset.from_dict({"text": ["held-out text, held-out text. " * 4]}).to_json(directory / "validation.jsonl")
    trainer = text_run(tmp_path, f"--dataset_name={directory}", "--eval_split=validation", "--eval_strategy=steps",
                       "--eval_steps=3")
    assert first_block_text(trainer) == "training text, t"
    assert any("eval_loss" in h for h in trainer.state.log_history)


def test_empty_or_missing_text_is_rejected_naming_it(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"`train_files`: files are empty: \[.*empty\.txt'\]"):
        parse_args([TEXT, "--train_files", empty, "--eval_strategy=no"])
    short = tmp_path / "short.txt"
    short.write_text("too short")
    arguments = parse_args([TEXT, "--train_files", short, "--eval_strategy=no", "--block_size=64"])
    with pytest.raises(ValueError, match=r"`train_files` \[.*short\.txt'\] holds no block of block_size=64"):
        build_trainer(*arguments)
    with pytest.raises(ValueError, match="eval_strategy.*eval_files"):
        parse_args([TEXT, "--train_files", short])  # the config evaluates every eval_steps: on what?
    with pytest.raises(ValueError, match="train_files.*dataset_name.*exactly one"):
        parse_args([TEXT, "--train_files", short, "--dataset_name=x", "--eval_strategy=no"])


# ---------------------------------------------------------------------------------------------------- LoRA


class Snapshot(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lora_trains_only_adapters_on_attention_projections(tiny_run, tmp_path):
    _, _, base_dir = tiny_run
    arguments = parse_args([
        TINY, *QUIET, "--max_steps=8", "--learning_rate=0.01", "--eval_strategy=no", "--save_strategy=no",
        f"--output_dir={tmp_path}", f"--init_from={base_dir}", "--lora_r", "4", "--lora_alpha=8",
    ])
    snapshot = Snapshot()
    trainer = build_trainer(*arguments, callbacks=[snapshot])
    before_loss = trainer.evaluate()["eval_loss"]
    trainer.train()
    after_loss = trainer.evaluate()["eval_loss"]
    assert after_loss < before_loss

    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, snapshot.before[n])}
    lora_names = {n for n in snapshot.before if "lora_" in n}
    assert changed == lora_names
    projections = {n.split(".self_attn.")[1].split(".")[0] for n in lora_names}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj"}
    layers = {n.split(".layers.")[1].split(".")[0] for n in lora_names}
    assert layers == {"0", "1"}  # the tensor layer and the standard layer both carry adapters

    trainer.save_model()
    assert (tmp_path / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor(trainer.eval_dataset[:2]["input_ids"])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, trainer.model.eval()(ids).logits, atol=1e-6)
