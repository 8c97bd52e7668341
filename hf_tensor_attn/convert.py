"""From a pretrained Llama-architecture model to a hybrid tensor-attention model with the same outputs.

A tensor layer scores pairs, s_t(a, b) = scale * <q_t, k1_a * k2_b>, and outputs sum_(a,b) P_t(a, b) v1_a * v2_b.
With k2_b = 1 and v2_b = 1 for every b, the score does not depend on b, the softmax over pairs is the softmax over a
(uniform over b), and the output is sum_a p_a v1_a: standard attention with q, k = k1, v = v1. So a tensor layer
whose q / k1 / v1 / o come from the pretrained layer, whose k2 / v2 projections are zero weights plus a bias of ones,
with RoPE on q and k1 only and the pretrained score scale 1/sqrt(head_dim), reproduces that layer exactly.
Fine-tuning then moves k2 / v2 away from ones only as far as the data rewards it.
"""

from __future__ import annotations

import copy
import os

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from . import compat
from .configuration import TensorAttnConfig
from .modeling import TensorAttnForCausalLM

# Families whose decoder weights map 1:1 onto ours (q/k/v/o, SwiGLU MLP, two RMS norms, RoPE), with the biases of
# their attention projections: (q, k, v) and o.
CONVERTIBLE_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _attention_biases(config) -> tuple[bool, bool]:
    """(q/k/v bias, o bias) of the source family."""
    if config.model_type == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


def _check_source(model) -> None:
    config = model.config
    if config.model_type not in CONVERTIBLE_MODEL_TYPES:
        raise ValueError(
            f"convert_from_llama converts models whose weights map 1:1 onto a Llama decoder, model_type in "
            f"{list(CONVERTIBLE_MODEL_TYPES)}; got model_type={config.model_type!r} ({type(model).__name__})"
        )
    if not hasattr(model, "lm_head") or not hasattr(model, "model"):
        raise ValueError(f"convert_from_llama needs a causal LM (e.g. LlamaForCausalLM), got {type(model).__name__}")
    if getattr(config, "mlp_bias", False):
        raise ValueError("the source has `mlp_bias=True`; tensor_attn MLPs have no biases, so it cannot be converted")
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise ValueError(
            f"the source attends within `sliding_window`={window} < max_position_embeddings="
            f"{config.max_position_embeddings}; the converted standard layers attend to the whole past. Set "
            f"model.config.sliding_window = None first (outputs then agree up to {window} tokens)"
        )
    other = sorted({t for t in (getattr(config, "layer_types", None) or []) if t != "full_attention"})
    if other:
        raise ValueError(f"the source has layer types {other}; only 'full_attention' layers can be converted")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type not in compat.STATIC_ROPE_TYPES:
        raise ValueError(
            f"the source's rope_parameters['rope_type'] is {rope_type!r}; convertible types (fixed frequencies) are "
            f"{list(compat.STATIC_ROPE_TYPES)}"
        )


def _tensor_layer_indices(tensor_layers, num_layers: int) -> list[int]:
    if not isinstance(tensor_layers, (list, tuple)):
        raise ValueError(
            f"`tensor_layers` must be a non-empty list of layer indices in [-{num_layers}, {num_layers}) (the source "
            f"has {num_layers} layers), got {tensor_layers!r}"
        )
    indices = list(tensor_layers)
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not -num_layers <= i < num_layers]
    if bad or not indices:
        raise ValueError(
            f"`tensor_layers` must be a non-empty list of layer indices in [-{num_layers}, {num_layers}) (the source "
            f"has {num_layers} layers), got {tensor_layers!r}"
        )
    indices = sorted({i % num_layers for i in indices})
    if len(indices) < len(tensor_layers):
        raise ValueError(f"`tensor_layers` names a layer twice: {tensor_layers!r}")
    return indices


def converted_config(source_config, tensor_layers: list[int], **overrides) -> TensorAttnConfig:
    """The `TensorAttnConfig` of the converted model: the source's sizes, norms, RoPE and special ids; tensor layers at
    `tensor_layers` that start as the source's layers (see the module docstring). `overrides` are config fields."""
    c = source_config
    qkv_bias, o_bias = _attention_biases(c)
    rope_parameters = copy.deepcopy(dict(c.rope_parameters or {}))
    rope_theta = rope_parameters.get("rope_theta", getattr(c, "rope_theta", TensorAttnConfig.rope_theta))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    fields = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads or c.num_attention_heads, head_dim=head_dim,
        layer_types=["tensor_attention" if i in tensor_layers else "full_attention" for i in range(c.num_hidden_layers)],
        score_scale=head_dim**-0.5, w1=None, w2=None, position_embedding_type="rope",
        tensor_rope_streams=["q", "k1"], rope_theta=rope_theta, rope_parameters=rope_parameters,
        max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act, rms_norm_eps=c.rms_norm_eps,
        attention_dropout=float(c.attention_dropout or 0.0), initializer_range=c.initializer_range,
        attention_bias=qkv_bias, attention_output_bias=o_bias, tensor_kv2_bias=True,
        tie_word_embeddings=bool(c.tie_word_embeddings), pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )
    unknown = sorted(set(overrides) - set(TensorAttnConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"`config_overrides` has keys {unknown} that are not TensorAttnConfig fields")
    return TensorAttnConfig(**{**fields, **overrides})


def _stacked_streams(first: torch.Tensor, heads: int, second_fill: float) -> torch.Tensor:
    """[H_kv * D, ...] weights (or bias) of one stream -> [H_kv * 2D, ...] with each head's two streams side by side:
    `first` then a second stream filled with `second_fill`."""
    per_head = first.reshape(heads, 1, first.shape[0] // heads, *first.shape[1:])  # [H_kv, 1, D, ...]
    second = torch.full_like(per_head, second_fill)
    return torch.cat([per_head, second], dim=1).reshape(2 * first.shape[0], *first.shape[1:])


def _converted_state_dict(source_state: dict, config: TensorAttnConfig) -> dict:
    state = dict(source_state)
    heads = config.num_key_value_heads
    for i, layer_type in enumerate(config.layer_types):
        if layer_type != "tensor_attention":
            continue
        prefix = f"model.layers.{i}.self_attn."
        for name in ("k", "v"):
            # Zero weights for the second stream; its value 1 comes from k2_bias / v2_bias.
            state[f"{prefix}{name}_proj.weight"] = _stacked_streams(state[f"{prefix}{name}_proj.weight"], heads, 0.0)
            if f"{prefix}{name}_proj.bias" in state:
                state[f"{prefix}{name}_proj.bias"] = _stacked_streams(state[f"{prefix}{name}_proj.bias"], heads, 0.0)
            weight = state[f"{prefix}{name}_proj.weight"]
            state[f"{prefix}{name}2_bias"] = torch.ones(heads, config.head_dim, dtype=weight.dtype, device=weight.device)
    return state


def convert_from_llama(
    model_or_path: PreTrainedModel | str | os.PathLike,
    tensor_layers: list[int],
    *,
    config_overrides: dict | None = None,
    dtype: torch.dtype | None = None,
) -> TensorAttnForCausalLM:
    """A `TensorAttnForCausalLM` whose layers `tensor_layers` are tensor layers that start as the source's layers.

    Args:
        model_or_path: a `LlamaForCausalLM` (or Mistral / Qwen2 causal LM, whose weights map 1:1), or a path or hub
            name `AutoModelForCausalLM.from_pretrained` loads.
        tensor_layers: indices of the layers to turn into tensor layers (negative counts from the end).
        config_overrides: `TensorAttnConfig` fields to change, e.g. `{"w1": 512, "w2": 64}`. Windows shorter than
            the context, another `score_scale` or RoPE on k2 break the exact start.
        dtype: dtype of the converted weights (default: the source's).

    The source's embeddings, norms, MLPs, standard layers and the chosen layers' q / k / v / o are copied; each
    tensor layer's k2 / v2 projections are zero weights plus a bias of ones (`tensor_kv2_bias`), RoPE rotates q and
    k1 only, and the score scale is 1/sqrt(head_dim): the converted model's logits equal the source's.
    `save_pretrained` output loads with the Auto classes; save the source's tokenizer beside it (the CLI
    `scripts/convert_llama.py` does).
    """
    if config_overrides is not None and not isinstance(config_overrides, dict):
        raise ValueError(f"`config_overrides` must be a dict of TensorAttnConfig fields such as {{'w1': 512}}, got "
                         f"{config_overrides!r}")
    source = model_or_path
    if not isinstance(source, PreTrainedModel):
        if not isinstance(source, (str, os.PathLike)):
            raise ValueError(f"`model_or_path` must be a causal LM (a PreTrainedModel), a folder or a Hub repo id, got "
                             f"{type(source).__name__} {source!r}")
        from .arguments import check_pretrained_source  # arguments pulls in the data modules: only when needed

        check_pretrained_source("model_or_path", os.fspath(source))
        source = AutoModelForCausalLM.from_pretrained(model_or_path, dtype=dtype)
    _check_source(source)
    indices = _tensor_layer_indices(tensor_layers, source.config.num_hidden_layers)
    config = converted_config(source.config, indices, **(config_overrides or {}))
    dtype = dtype or next(source.parameters()).dtype
    model = TensorAttnForCausalLM(config).to(dtype)
    # strict: every parameter of the converted model is set (a tied lm_head appears in both state dicts)
    model.load_state_dict(_converted_state_dict(source.state_dict(), config), strict=True)
    model.generation_config = copy.deepcopy(source.generation_config)
    model.generation_config.cache_implementation = None  # tensor layers pick their layout themselves
    return model.eval() if not source.training else model


__all__ = ["CONVERTIBLE_MODEL_TYPES", "convert_from_llama", "converted_config"]
