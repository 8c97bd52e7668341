"""Run arguments that used to fail late or not at all (issue #15), each refused by name before anything runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hf_tensor_attn import TensorAttnByteTokenizer
from hf_tensor_attn.arguments import ModelArguments, parse_args
from hf_tensor_attn.training import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "match3-tiny.json"


def test_init_from_a_missing_folder_is_refused_by_name(tmp_path):
    """It said "Repo id must use alphanumeric chars"."""
    with pytest.raises(ValueError, match=r"`init_from` '/nonexistent' is no existing folder \(nor a Hub repo id"):
        parse_args([TINY, "--init_from=/nonexistent", f"--output_dir={tmp_path}"])


@pytest.mark.parametrize("steps", [-5, 0])
def test_max_steps_below_one_is_refused(tmp_path, steps):
    """max_steps=-5 trained 3 epochs (transformers reads every value <= 0 as "unset")."""
    with pytest.raises(ValueError, match=rf"`max_steps` must be an int >= 1, or -1 .*got {steps}"):
        parse_args([TINY, f"--max_steps={steps}", f"--output_dir={tmp_path}"])


def test_a_truncated_tokenizer_config_is_not_silently_replaced(tmp_path):
    """build_tokenizer caught the JSONDecodeError (a ValueError) and fell back to a default tokenizer."""
    TensorAttnByteTokenizer(add_bos_token=True).save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": tr')
    with pytest.raises(ValueError, match=r"`init_from` .*tokenizer_config.json is not valid JSON"):
        build_tokenizer(ModelArguments(init_from=str(tmp_path)))


def test_a_model_folder_without_tokenizer_still_gets_the_byte_tokenizer(tmp_path):
    assert isinstance(build_tokenizer(ModelArguments(init_from=str(tmp_path))), TensorAttnByteTokenizer)


# Issue #35: values train.py accepted until a traceback.
@pytest.mark.parametrize(
    "option, match",
    [
        ("--learning_rate=nan", r"`learning_rate` must be a finite float >= 0, got nan"),
        ("--learning_rate=inf", r"`learning_rate` must be a finite float >= 0, got inf"),
        ("--learning_rate=-0.1", r"`learning_rate` must be a finite float >= 0, got -0.1"),
        ("--per_device_train_batch_size=0", r"`per_device_train_batch_size` must be an int >= 1 .*got 0"),
        ("--per_device_eval_batch_size=-2", r"`per_device_eval_batch_size` must be an int >= 1 .*got -2"),
    ],
)
def test_training_numbers_out_of_range_are_refused(tmp_path, option, match):
    with pytest.raises(ValueError, match=match):
        parse_args([TINY, option, f"--output_dir={tmp_path}"])


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match=rf"`output_dir` {re.escape(repr(str(path)))} is an existing file"):
        parse_args([TINY, f"--output_dir={path}"])


def test_rope_parameters_in_a_run_config_reach_the_model_config(tmp_path):
    """It said "unknown key ... did you mean 'ddp_find_unused_parameters'"."""
    import json

    rope = {"rope_type": "linear", "factor": 2.0}
    config = {**json.loads(TINY.read_text()), "position_embedding_type": "rope", "rope_parameters": rope,
              "output_dir": str(tmp_path / "run")}
    (tmp_path / "run.json").write_text(json.dumps(config))
    model_args, _, _ = parse_args([tmp_path / "run.json"])
    assert model_args.config_overrides()["rope_parameters"] == rope
    model_args, _, _ = parse_args([TINY, "--position_embedding_type=rope", '--rope_parameters={"rope_type": "linear", '
                                   '"factor": 2.0}', f"--output_dir={tmp_path}"])
    assert model_args.rope_parameters == rope
    with pytest.raises(ValueError, match=r"`rope_parameters` must be a JSON object .*got '\[1\]'"):
        parse_args([TINY, "--rope_parameters=[1]", f"--output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"`rope_parameters\['factor'\]` must be .*got 0.5"):
        parse_args([TINY, "--position_embedding_type=rope", '--rope_parameters={"rope_type": "linear", "factor": 0.5}',
                    f"--output_dir={tmp_path}"])
