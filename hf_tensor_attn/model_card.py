"""The model card (README.md) a model save writes: transformers' metadata header, the architecture of the saved
config, the package it needs and a snippet that loads the folder and generates with a cache layout."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import transformers
from huggingface_hub import ModelCard, ModelCardData

from .cache import available_cache_implementations

TAGS = ["tensor-attention", "2-simplicial-attention", "hf_tensor_attn", "custom_code"]
FILE_NAME = "README.md"
# Our cards carry this line; a README.md without it is the user's and no save replaces it.
MARKER = "<!-- written by hf_tensor_attn's save_pretrained, which rewrites it; delete this line to keep your edits -->"


def _windows(config) -> str:
    if config.w1 is None and config.w2 is None:
        return "none (every earlier pair)"
    return f"w1 = {config.w1}, w2 = {config.w2} (a pair (a, b) is kept when t - a < w1 and t - b < w2)"


def _layers(config) -> str:
    counts = Counter(config.layer_types)
    summary = ", ".join(f"{count} × `{kind}`" for kind, count in counts.items())
    return f"{summary}; in order: {', '.join(f'`{kind}`' for kind in config.layer_types)}"


def render(config, path: str, version: str, self_contained: bool, model_tags: list[str] | None = None) -> str:
    """The card's text for a model with this config saved to `path` (a folder or a Hub repository id) by
    hf_tensor_attn `version`; `model_tags` (the model's `add_model_tags`) join our tags."""
    tags = list(TAGS) + [tag for tag in model_tags or () if tag not in TAGS]
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=tags)
    layouts = available_cache_implementations()
    if self_contained:
        needs = ("The package's code is in this folder (`tensor_attn_remote.py` and the `hf_tensor_attn__*.py` "
                 "files): `trust_remote_code=True` needs nothing but torch and transformers.")
    else:
        needs = ("Loading needs the `hf_tensor_attn` package installed (a wheel built with `python -m build` from its "
                 "source, `pip install git+<repository URL>` or `pip install -e <checkout>`); "
                 "`save_pretrained(..., self_contained=True)` writes a folder that needs only torch and transformers.")
    rows = [
        ("layers", _layers(config)),
        ("tensor-attention windows", _windows(config)),
        ("heads", f"{config.num_attention_heads} query heads, {config.num_key_value_heads} key/value heads, "
                  f"head dim {config.head_dim}"),
        ("hidden size / MLP", f"{config.hidden_size} / {config.intermediate_size} ({config.hidden_act})"),
        ("score scale", f"{config.score_scale:g}"),
        ("positions", f"{config.position_embedding_type}, up to {config.max_position_embeddings}"),
        ("vocabulary", f"{config.vocab_size}"),
        ("default cache layout", f"`{config.default_cache_implementation}`"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    text = f"""
{MARKER}

# Tensor-attention causal language model

A causal language model with tensor (2-simplicial) attention: a query attends to *pairs* of earlier tokens
(Roy et al. 2025; Alman & Song). Saved with `hf_tensor_attn` {version} and transformers {transformers.__version__}.

| | |
|---|---|
{table}

{needs}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = {path!r}  # this folder, or its Hub repository id
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
ids = tokenizer("3 14 22 ", return_tensors="pt").input_ids
layout = "{config.default_cache_implementation}"
out = model.generate(ids, max_new_tokens=16, do_sample=False, cache_implementation=layout)
print(tokenizer.decode(out[0]))
```

`cache_implementation` picks how the cache holds the past: {", ".join(f"`{name}`" for name in layouts)}.
"""
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + text).content


def ours(path) -> bool:
    """Whether the README.md at `path` is missing or one of our cards (so a save may write it)."""
    path = Path(path)
    return not path.exists() or MARKER in path.read_text(encoding="utf-8", errors="replace")


__all__ = ["FILE_NAME", "MARKER", "TAGS", "ours", "render"]
