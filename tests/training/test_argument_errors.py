"""Run arguments that used to fail late or not at all (issue #15), each refused by name before anything runs."""

from __future__ import annotations

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
