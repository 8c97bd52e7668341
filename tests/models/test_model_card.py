"""The model card a save writes (issue 34): transformers' metadata header, the saved config's architecture, the
package version, and a snippet that runs as written."""

from __future__ import annotations

import re
from pathlib import Path
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard

import hf_tensor_attn
from hf_tensor_attn import TensorAttnByteTokenizerFast, model_card

ARCHITECTURES = [
    dict(layer_types=["tensor_attention", "full_attention", "tensor_attention"], w1=8, w2=4, num_attention_heads=4,
         num_key_value_heads=2),
    dict(layer_types=["full_attention", "poly_tensor_attention", "tensor_attention"], num_attention_heads=2),
]


@pytest.mark.parametrize("overrides", ARCHITECTURES, ids=["windows-gqa", "poly"])
def test_the_card_states_the_saved_architecture(tmp_path, make_model, overrides):
    model = make_model(torch.float32, num_hidden_layers=3, **overrides)
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"tensor-attention", "custom_code"} <= set(card.data.tags)
    config = model.config
    assert f"in order: {', '.join(f'`{t}`' for t in config.layer_types)}" in card.text
    windows = f"w1 = {config.w1}, w2 = {config.w2}" if config.w1 else "none (every earlier pair)"
    assert windows in card.text
    assert f"{config.num_attention_heads} query heads, {config.num_key_value_heads} key/value heads" in card.text
    assert f"`hf_tensor_attn` {hf_tensor_attn.__version__}" in card.text


def test_the_snippet_runs_as_written(tmp_path, make_model):
    model = make_model(torch.float32)
    model.save_pretrained(tmp_path / "model", self_contained=True)
    TensorAttnByteTokenizerFast().save_pretrained(tmp_path / "model", self_contained=True)
    card = (tmp_path / "model" / "README.md").read_text()
    assert "self_contained=True" not in card and "needs nothing but torch and transformers" in card
    snippet = re.search(r"```python\n(.*?)```", card, flags=re.DOTALL).group(1)
    # in another process and folder: the card names the folder save_pretrained was given
    run = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300, cwd="/")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("3 14 22 ")


def test_a_card_the_user_wrote_is_kept(tmp_path, make_model):
    (tmp_path / "README.md").write_text("my own card\n")
    make_model(torch.float32).save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my own card\n"
    make_model(torch.float32).save_pretrained(tmp_path / "ours", self_contained=True)
    card = (tmp_path / "ours" / "README.md").read_text()
    edited = card.replace(model_card.MARKER, "")  # the card says: delete the marker line to keep your edits
    (tmp_path / "ours" / "README.md").write_text(edited)
    make_model(torch.float32).save_pretrained(tmp_path / "ours", self_contained=False)
    assert (tmp_path / "ours" / "README.md").read_text() == edited


@pytest.mark.parametrize("entry", ["save_pretrained", "push_to_hub"])
def test_push_to_hub_uploads_our_card_and_the_code(tmp_path, make_model, monkeypatch, entry):
    """transformers' own push writes a generic card into the folder before uploading; ours must be the one sent.
    The Hub is replaced by recorders: the repository creation and the upload of the folder as it is then."""
    from transformers.utils import hub

    created, uploaded = [], {}

    class Api:
        def create_repo(self, repo_id, **kwargs):
            created.append((repo_id, kwargs))
            return type("Url", (), {"repo_id": f"someone/{repo_id}"})()

    def upload(self, folder, repo_id, files_timestamps, commit_message=None, token=None, create_pr=False,
               revision=None, commit_description=None):
        uploaded.update(repo_id=repo_id, commit_message=commit_message, create_pr=create_pr, revision=revision,
                        files={p.name: p.read_text() for p in Path(folder).glob("*") if p.suffix in (".md", ".py")})

    monkeypatch.setattr(hub, "hf_api", lambda: Api())
    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files", upload)
    model = make_model(torch.float32)
    if entry == "save_pretrained":
        model.save_pretrained(tmp_path / "tiny", push_to_hub=True, self_contained=True, commit_message="first",
                              private=True, max_shard_size="1GB")
        assert (tmp_path / "tiny" / "README.md").read_text() == uploaded["files"]["README.md"]  # what was pushed
    else:
        model.push_to_hub("tiny", self_contained=True, commit_message="first", private=True, revision="dev",
                          tags=["mine"])
        assert uploaded["revision"] == "dev" and "- mine" in uploaded["files"]["README.md"]
    assert created == [("tiny", {"exist_ok": True, "private": True})]
    assert uploaded["repo_id"] == "someone/tiny" and uploaded["commit_message"] == "first"
    card = uploaded["files"]["README.md"]
    assert "# Tensor-attention causal language model" in card and "path = 'someone/tiny'" in card
    assert "hf_tensor_attn__modeling.py" in uploaded["files"] and "tensor_attn_remote.py" in uploaded["files"]
