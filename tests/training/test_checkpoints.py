"""Crash-safe training checkpoints (issue #15): a checkpoint folder exists under its final name only when complete,
resume picks the newest complete one and says why, and a checkpoint without optimizer or scheduler state refuses to
resume exactly unless told (`resume_weights_only`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hf_tensor_attn import compat
from hf_tensor_attn.arguments import parse_args
from hf_tensor_attn.training import param_checksum, train

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "match3-tiny.json"
# 8 steps with checkpoints at 4 and 8, no evaluation: a few seconds.
RUN = ["--disable_tqdm=true", "--logging_steps=2", "--max_steps=8", "--save_steps=4", "--eval_strategy=no",
       "--num_train_examples=128"]


def run(output_dir, *extra):
    return train(*parse_args([TINY, *RUN, f"--output_dir={output_dir}", *extra]))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    stale = out / compat.CHECKPOINT_STAGING_DIR / "checkpoint-12"  # what a run killed while saving step 12 left
    stale.mkdir(parents=True)
    (stale / "optimizer.pt").write_bytes(b"half")
    trainer = run(out)
    return out, param_checksum(trainer.model)


def test_checkpoints_are_complete_and_no_staging_is_left(uninterrupted):
    out, _ = uninterrupted
    for step in (4, 8):
        names = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"} <= names
    # none of this run's, nor the one a killed earlier run left
    assert not any(p.name.startswith(".") for p in out.rglob("*")), "staging folders left behind"


def test_resume_skips_a_partial_checkpoint_and_matches_the_uninterrupted_run(uninterrupted, tmp_path, caplog):
    """The issue's case: a run killed while writing checkpoint-8 left a partial folder; `true` picked it and crashed
    (FileNotFoundError: trainer_state.json) instead of resuming from the intact checkpoint-4."""
    out, expected = uninterrupted
    shutil.copytree(out / "checkpoint-4", tmp_path / "checkpoint-4")
    partial = tmp_path / "checkpoint-8"
    partial.mkdir()
    shutil.copy(out / "checkpoint-8" / "config.json", partial)  # what a save killed early leaves
    with caplog.at_level("WARNING"):
        resumed = run(tmp_path, "--resume_from_checkpoint=true")
    assert "checkpoint-4: the newest complete checkpoint" in caplog.text
    assert "skipped the newer checkpoint-8 (no trainer_state.json" in caplog.text
    assert resumed.state.global_step == 8
    assert param_checksum(resumed.model) == expected  # bit for bit


@pytest.mark.parametrize("missing", ["scheduler.pt", "optimizer.pt"])
def test_a_checkpoint_without_optimizer_or_scheduler_state_refuses_to_resume(uninterrupted, tmp_path, missing):
    """It used to resume with exit code 0, silently restarting optimizer and schedule."""
    out, expected = uninterrupted
    shutil.copytree(out / "checkpoint-4", tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / missing).unlink()
    with pytest.raises(ValueError, match=rf"checkpoint-4' has no {missing}: .*resume_weights_only"):
        run(tmp_path, "--resume_from_checkpoint=true")
    with pytest.raises(ValueError, match=rf"has no {missing}"):
        run(tmp_path, f"--resume_from_checkpoint={tmp_path / 'checkpoint-4'}")
    allowed = run(tmp_path, "--resume_from_checkpoint=true", "--resume_weights_only=true")  # explicitly allowed
    assert allowed.state.global_step == 8
    assert param_checksum(allowed.model) != expected


def test_a_checkpoint_save_that_fails_leaves_no_checkpoint_folder(tmp_path, monkeypatch):
    """Disk full while writing the optimizer state of checkpoint-4: no folder named checkpoint-4 appears."""
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if str(f).endswith(compat.OPTIMIZER_NAME):
            Path(f).write_bytes(b"half")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        run(tmp_path)
    assert not (tmp_path / "checkpoint-4").exists()
    with pytest.raises(ValueError, match="found no complete checkpoint"):
        run(tmp_path, "--resume_from_checkpoint=true")
