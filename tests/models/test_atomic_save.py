"""Crash-safe saves (issue #15): model, config and tokenizer `save_pretrained` write into a temporary folder beside
the target and swap it in only when complete, so a save that fails half-way (disk full) leaves the previous
checkpoint loadable with identical outputs."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import modeling_utils

from hf_tensor_attn import TensorAttnByteTokenizer
from hf_tensor_attn import atomic
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


# ---- folder modes, links, what killed saves leave, the fallback swap ----


@pytest.fixture
def umask():
    """Set the process umask for a test, restoring the previous one afterwards."""
    before = os.umask(0o022)
    os.umask(before)
    yield os.umask
    os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077], ids=oct)
def test_saved_folders_get_the_mode_the_umask_gives(tmp_path, make_model, umask, mask):
    umask(mask)
    plain = tmp_path / "plain"
    plain.mkdir()  # what a plain (non-atomic) save's os.makedirs gives
    model_dir, tok_dir = tmp_path / "model", tmp_path / "tok"
    make_model(torch.float32).save_pretrained(model_dir)
    TensorAttnByteTokenizer().save_pretrained(tok_dir)
    assert mode(model_dir) == mode(tok_dir) == mode(plain) == 0o777 & ~mask
    assert mode(model_dir / "config.json") == 0o666 & ~mask


def test_a_save_over_a_folder_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "tok"
    target.mkdir()
    target.chmod(0o750)
    TensorAttnByteTokenizer().save_pretrained(target)
    assert mode(target) == 0o750 and (target / "tokenizer_config.json").exists()


def test_a_save_to_a_symlink_writes_through_it(tmp_path, make_model):
    real = tmp_path / "store" / "model"
    TensorAttnByteTokenizer().save_pretrained(real)
    link = tmp_path / "latest"
    link.symlink_to(real, target_is_directory=True)
    make_model(torch.float32).save_pretrained(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in real.iterdir()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert no_staging_left(real) and AutoModelForCausalLM.from_pretrained(link) is not None


KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
from hf_tensor_attn import atomic
target = Path(sys.argv[1])
if sys.argv[2] == "between-renames":  # the fallback swap, killed after moving the old folder aside
    atomic._exchange = lambda a, b: False
    rename = os.rename
    def rename_then_die(src, dst):
        rename(src, dst)
        if ".old-" in str(dst):
            os.kill(os.getpid(), signal.SIGKILL)
    atomic.os.rename = rename_then_die
with atomic.atomic_directory(target) as staging:
    (staging / "a.txt").write_text("new")
    if sys.argv[2] == "while-writing":
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("when", ["while-writing", "between-renames"])
def test_the_next_save_cleans_what_a_killed_save_left(tmp_path, when):
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("old")
    run = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target), when], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    left = sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.name.startswith("."))
    assert left == ([".out.old", ".out.saving"] if when == "between-renames" else [".out.saving"])
    assert target.exists() == (when == "while-writing")
    running = tmp_path / f".other.saving-{atomic._host()}-{os.getpid()}-00"  # a save of this live process
    running.mkdir()
    with atomic_directory(tmp_path / "another") as staging:
        (staging / "b.txt").write_text("b")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, "another", "out"])
    assert (target / "a.txt").read_text() == "old"  # the killed fallback swap's old folder is back in place


def test_the_fallback_swap_without_renameat2(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: calls.append((a, b)) or False)
    target = tmp_path / "out"
    for text in ("one", "two"):
        with atomic_directory(target) as staging:
            (staging / "a.txt").write_text(text)
            (staging / f"{text}.txt").write_text(text)
    assert len(calls) == 1  # the first save had no folder to swap with
    assert (target / "a.txt").read_text() == "two" and (target / "one.txt").exists()  # kept from the first save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
