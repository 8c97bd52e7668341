"""Crash-safe saves (issue #15): model, config and tokenizer `save_pretrained` write into a temporary folder beside
the target and swap it in only when complete, so a save that fails half-way (disk full) leaves the previous
checkpoint loadable with identical outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import modeling_utils

from hf_tensor_attn import TensorAttnByteTokenizer
from hf_tensor_attn.atomic import atomic_directory


def disk_full_after_half(real):
    """A writer that writes half of what `real` would, then fails as a full disk does."""

    def write(*args, **kwargs):
        real(*args, **kwargs)
        path = Path(args[1] if len(args) > 1 else kwargs["filename"])
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        raise OSError(28, "No space left on device")

    return write


def no_staging_left(folder: Path) -> bool:
    return not any(p.name.startswith(f".{folder.name}.") for p in folder.parent.iterdir())


def test_a_model_save_that_fails_half_way_leaves_the_old_checkpoint(tmp_path, monkeypatch, make_model):
    """The issue's case: config.json was already replaced, so the old checkpoint failed with a size mismatch."""
    old, new = make_model(torch.float32), make_model(torch.float32, hidden_size=48, num_attention_heads=2)
    target = tmp_path / "model"
    old.save_pretrained(target)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = old(ids).logits
    monkeypatch.setattr(modeling_utils, "safe_save_file", disk_full_after_half(modeling_utils.safe_save_file))
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(target)
    reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)
    assert no_staging_left(target)


def test_a_tokenizer_save_that_fails_half_way_leaves_the_old_tokenizer(tmp_path, monkeypatch):
    target = tmp_path / "tok"
    TensorAttnByteTokenizer(add_bos_token=True, padding_side="right").save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real = TensorAttnByteTokenizer.save_chat_templates

    def fail_after_templates(self, *args, **kwargs):
        real(self, *args, **kwargs)  # the chat template file is written, tokenizer_config.json not yet
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorAttnByteTokenizer, "save_chat_templates", fail_after_templates)
    with pytest.raises(OSError, match="No space left"):
        TensorAttnByteTokenizer(chat_template="{{ messages }}").save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    loaded = AutoTokenizer.from_pretrained(target)
    assert loaded.add_bos_token and loaded.padding_side == "right" and loaded("a").input_ids == [1, 100]
    assert no_staging_left(target)


def test_a_save_keeps_the_files_it_does_not_write_but_not_stale_weights(tmp_path, make_model):
    target = tmp_path / "run"
    TensorAttnByteTokenizer().save_pretrained(target)
    (target / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of an older save")
    make_model(torch.float32).save_pretrained(target)
    names = {p.name for p in target.iterdir()}
    assert {"tokenizer_config.json", "config.json", "model.safetensors"} <= names
    assert "model-00001-of-00002.safetensors" not in names
    assert AutoTokenizer.from_pretrained(target) is not None and no_staging_left(target)


def test_atomic_directory_swaps_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "a.txt").write_text("two")
            raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "one" and no_staging_left(target)


@pytest.mark.parametrize("options", [dict(add_bos_token=True, add_eos_token=True, padding_side="right"),
                                     dict(add_bos_token=False, add_eos_token=True, padding_side="left")])
def test_tokenizer_settings_survive_a_round_trip(tmp_path, options):
    """add_bos_token and add_eos_token came back as their defaults after save_pretrained -> from_pretrained."""
    tokenizer = TensorAttnByteTokenizer(**options)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert {name: getattr(loaded, name) for name in options} == options
    assert loaded("ab").input_ids == tokenizer("ab").input_ids


def test_settings_changed_after_construction_are_saved(tmp_path):
    tokenizer = TensorAttnByteTokenizer()
    tokenizer.add_eos_token, tokenizer.padding_side = True, "right"
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.add_eos_token and loaded.padding_side == "right"


def test_a_truncated_tokenizer_config_names_the_file(tmp_path):
    TensorAttnByteTokenizer().save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": tr')
    with pytest.raises(ValueError, match="not valid JSON .*truncated"):
        TensorAttnByteTokenizer.from_pretrained(tmp_path)
