"""Tensor-attention causal LM for transformers 5.x, laid out like transformers' Llama.

Each decoder layer is either tensor (2-simplicial) attention, where query t attends to pairs (a, b) of earlier
tokens with score <q_t, k1_a * k2_b> and value v1_a * v2_b, or standard softmax attention (SDPA), as the
config's `layer_types` say.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.utils import logging

from . import compat, model_card, remote_code
from .atomic import MODEL_WEIGHT_FILES, atomic_directory
from .cache import LAYOUTS, TensorAttnCache, TensorAttnConstants, available_cache_implementations
from .configuration import TensorAttnConfig
from .ops import attention, poly_tensor_attention
from .ops.exact.naive import naive_tensor_attention_with_weights
from .ops.common import masked_softmax, repeat_kv

logger = logging.get_logger(__name__)


class TensorAttnRMSNorm(nn.RMSNorm):
    pass


class TensorAttnRotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embeddings for the given position ids; `config.rope_parameters` picks the
    frequencies as in Llama (compat item 9), times its attention scaling (1 except for "yarn")."""

    def __init__(self, config: TensorAttnConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = compat.rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @staticmethod
    def compute_inv_freq(config: TensorAttnConfig) -> torch.Tensor:
        return compat.rope_frequencies(config)[0]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables [B, T, D] of `TensorAttnRotaryEmbedding` as `apply_rotary` takes them: [B, 1, T, D] for the heads,
    sin with its first half negated, made once per forward for every layer."""
    half = sin.shape[-1] // 2
    return cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by the tables of `rotary_tables` (or shapes that broadcast so). Llama's
    x cos + rotate_half(x) sin, with rotate_half(x) = (-x2, x1) written as roll(x) = (x2, x1) times the signed sin:
    the same products (a negation is exact), in two ops fewer."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` where it does something (training, p > 0): a decode step in eval skips the call."""
    return module(x) if module.training and module.p > 0 else x


class TensorAttnMLP(nn.Module):
    def __init__(self, config: TensorAttnConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TensorAttention(nn.Module):
    """2-simplicial attention. `k_proj` and `v_proj` produce both streams of a key/value head side by side:
    k = k1 | k2 and v = v1 | v2 along the head features, which is also the layout the cache receives (and keeps a
    head's streams together when the projection is split by output columns). With `num_key_value_heads` < heads,
    each key/value head serves a group of query heads (grouped-query attention)."""

    def __init__(self, config: TensorAttnConfig, layer_idx: int):
        super().__init__()
        self.config = config  # its `_attn_implementation` decides whether weights are returned
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.constants = TensorAttnConstants.from_config(config)
        rope = config.position_embedding_type == "rope"
        self.rope_streams = frozenset(config.tensor_rope_streams) if rope else frozenset()
        inner, kv_inner = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, 2 * kv_inner, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, 2 * kv_inner, bias=config.attention_bias)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=config.attention_output_bias)
        # Separate parameters rather than a bias on all of k_proj: the k1 / v1 streams keep `attention_bias`.
        self.k2_bias = self.v2_bias = None
        if config.tensor_kv2_bias:
            self.k2_bias = nn.Parameter(torch.zeros(self.num_key_value_heads, self.head_dim))
            self.v2_bias = nn.Parameter(torch.zeros(self.num_key_value_heads, self.head_dim))
        self.dropout = nn.Dropout(config.attention_dropout)

    def _streams(self, proj: nn.Linear, bias2, hidden_states) -> torch.Tensor:
        """[B, H_kv, T, 2D]: the two streams of each key/value head, side by side, plus the second stream's bias."""
        B, T, _ = hidden_states.shape
        x = proj(hidden_states).view(B, T, -1, 2 * self.head_dim)  # -1: this rank's heads under tensor parallelism
        if bias2 is not None:
            x = x + F.pad(bias2, (self.head_dim, 0))  # [H_kv, 2D]: zeros on the first stream
        return x.transpose(1, 2)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, output_attentions=False,
                documents=None):
        B, T, _ = hidden_states.shape
        # -1 heads: under tensor parallelism the projections hold only this rank's heads (config.base_model_tp_plan).
        q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self._streams(self.k_proj, self.k2_bias, hidden_states)  # [B, H_kv, T, 2D]
        v = self._streams(self.v_proj, self.v2_bias, hidden_states)  # [B, H_kv, T, 2D]
        if self.rope_streams:
            cos, sin = position_embeddings  # `rotary_tables`
            if "q" in self.rope_streams:
                q = apply_rotary(q, cos, sin)
            if {"k1", "k2"} <= self.rope_streams:  # both streams at once, as [B, H_kv, T, 2, D]
                k = apply_rotary(k.unflatten(-1, (2, self.head_dim)), cos[..., None, :], sin[..., None, :]).flatten(-2)
            elif self.rope_streams & {"k1", "k2"}:
                k1, k2 = k.chunk(2, dim=-1)
                k1 = apply_rotary(k1, cos, sin) if "k1" in self.rope_streams else k1
                k2 = apply_rotary(k2, cos, sin) if "k2" in self.rope_streams else k2
                k = torch.cat((k1, k2), dim=-1)

        custom = attention_mask is not None and attention_mask.dim() == 4  # per-query allowed keys (no cache)
        if cache is not None:
            out = cache.attend(self.layer_idx, q, k, v, attention_mask)  # the cache's layout does the maths
        elif custom:
            out = attention(self.constants, q, k, v, query_masks=attention_mask[:, 0].expand(B, T, T))
        else:
            out = attention(self.constants, q, k, v, attention_mask=attention_mask, documents=documents)
        weights = None
        if output_attentions and self.config._attn_implementation == "eager":
            if documents is not None or custom:
                raise ValueError("output_attentions with packed sequences or a 4D attention_mask: the weights of such "
                                 "a row are not computed; pass one sequence per row (2D mask) to get them")
            out, weights = eager_tensor_attention(self, q, k, v, attention_mask, cache, out)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(dropout(self.dropout, out)), weights


class PolyTensorAttention(nn.Module):
    """Tensor attention with the polynomial kernel (Alman & Song): weights P(s) / sum P(s), P the degree-g Taylor
    polynomial of exp, trained as such. q, k1, k2 are projected to `poly_feature_dim` = f features per head so that
    the state stays small (r = C(f + g, g) features); values keep `head_dim`. No rotary embedding: the kernel state
    sums over positions, and causality orders tokens. Cost O(T r d) for a sequence, O(r d) per decode step."""

    def __init__(self, config: TensorAttnConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.feature_dim = config.poly_feature_dim
        self.degree = config.poly_degree
        self.scale = config.poly_score_scale
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.feature_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, 2 * self.num_heads * self.feature_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, 2 * inner, bias=config.attention_bias)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=config.attention_output_bias)
        self.dropout = nn.Dropout(config.attention_dropout)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, output_attentions=False,
                documents=None):
        # No weights even when asked (output_attentions): the kernel's state sums over positions; see
        # `eager_tensor_attention` for the convention of the exact tensor layers.
        B, T, _ = hidden_states.shape
        f = self.feature_dim
        # -1 heads: under tensor parallelism the projections hold only this rank's heads (config.base_model_tp_plan);
        # k_proj and v_proj rows are laid out per head (k1 | k2, v1 | v2), so a rank's split keeps both streams.
        q = self.q_proj(hidden_states).view(B, T, -1, f).transpose(1, 2)  # [B, H, T, f]
        k = self.k_proj(hidden_states).view(B, T, -1, 2 * f).transpose(1, 2)  # [B, H, T, 2f]: k1 | k2
        v = self.v_proj(hidden_states).view(B, T, -1, 2 * self.head_dim).transpose(1, 2)  # [B, H, T, 2D]: v1 | v2
        if cache is not None:
            out = cache.attend(self.layer_idx, q, k, v, attention_mask)  # this layer's cache is always the poly state
        else:
            k1, k2 = k.chunk(2, dim=-1)
            v1, v2 = v.chunk(2, dim=-1)
            out = poly_tensor_attention(q, k1, k2, v1, v2, scale=self.scale, degree=self.degree,
                                        attention_mask=attention_mask, documents=documents)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(dropout(self.dropout, out)), None


def eager_tensor_attention(module: TensorAttention, q, k, v, attention_mask, cache, out):
    """(output, weights) of a tensor layer under `attn_implementation="eager"` with `output_attentions=True`: the
    reference (`ops.exact.naive.naive_tensor_attention_with_weights`, O(Tq * Tk^2) memory), computed only when
    weights are asked for. The weights are, per query, the pair weights marginalised over the second key,
    P_t(a) = sum_b P_t(a, b), [B, H, Tq, Tk] like a standard layer's (each row a distribution over the first key a),
    and the output is computed through them, so they are part of the graph as softmax attention's are.
    `q` [B, H, Tq, D]; `k`, `v` [B, H_kv, Tq, 2D] the new tokens' streams; with a cache, the streams it holds
    (already updated by the fast path) are used instead. Where the weights do not exist -- a layout that keeps a
    summary instead of every token (SubGen, windows) -- `out` (the fast path's [B, H, Tq, D]) is returned with None."""
    if cache is not None:
        layer = cache.layers[module.layer_idx]
        if layer.keys.shape[2] != layer.seen:
            return out, None
        k, v = layer.keys, layer.values
    k1, k2 = k.chunk(2, dim=-1)  # [B, H_kv, Tk, D] each
    v1, v2 = v.chunk(2, dim=-1)
    c = module.constants
    return naive_tensor_attention_with_weights(
        q, k1, k2, v1, v2, scale=c.scale, w1=c.w1, w2=c.w2, attention_mask=attention_mask
    )


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention with a boolean mask [B or 1, 1, Tq, Tk]; the reference of the SDPA path, and the
    backend that returns its weights. Returns ([B, Tq, H, D], weights [B, H, Tq, Tk])."""
    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    weights = masked_softmax(torch.matmul(query, key.transpose(-1, -2)) * scaling, attention_mask)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class StandardAttention(nn.Module):
    """Causal softmax attention for the `"full_attention"` layers of a hybrid stack, through transformers' attention
    interface: `config._attn_implementation` "sdpa" (default), "eager" (returns attention weights) or
    "flex_attention" (torch's FlexAttention with a block mask; on CPU torch runs it forward only)."""

    is_causal = True

    def __init__(self, config: TensorAttnConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads  # read by the attention interface
        self.head_dim = config.head_dim
        self.use_rope = config.position_embedding_type == "rope"
        inner, kv_inner = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_inner, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_inner, bias=config.attention_bias)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=config.attention_output_bias)
        self.dropout = nn.Dropout(config.attention_dropout)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, output_attentions=False,
                documents=None):
        # The eager backend returns its weights whether or not they are asked for: they are computed anyway.
        B, T, _ = hidden_states.shape
        # -1 heads: this rank's heads under tensor parallelism
        q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H_kv, T, D]
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.use_rope:
            cos, sin = position_embeddings
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if isinstance(cache, TensorAttnCache) and cache.attends(self.layer_idx):
            # The layer summarises what it holds (cache_config["standard_layers"] = "subgen"): it does the maths.
            out = cache.attend(self.layer_idx, q, k, v, attention_mask).transpose(1, 2)  # [B, T, H, D]
            return self.o_proj(dropout(self.dropout, out.reshape(B, T, -1))), None
        first = None  # position of the first query: the last T of the keys, unless the cache is static
        if cache is not None:
            first = cache.layers[self.layer_idx].get_seq_length()  # before the update; a tensor in a static layer,
            first = first.clone() if isinstance(first, torch.Tensor) else first  # which the update advances in place
            k, v = cache.update(k, v, self.layer_idx)
        backend = self.config._attn_implementation
        if (T == 1 and attention_mask is None and documents is None and not isinstance(first, torch.Tensor)
                and backend != "flex_attention"):
            mask = None  # one query, the last key, nothing padded: it sees every key (a decode step)
        else:
            mask = causal_padding_mask(T, k.shape[2], attention_mask, q.device, first)  # [B or 1, 1, T, Tk]
        if documents is not None:  # a packed row: each token sees its own document only (no cache: Tk = T)
            mask = mask & (documents[:, None, :, None] == documents[:, None, None, :])
        if backend == "flex_attention":
            mask = flex_block_mask(mask)
        # Through get_interface, as transformers' models do: `set_attn_implementation` looks for this call in the
        # module source before it lets a model switch its backend (compat item 6).
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(backend, eager_attention)
        out, weights = attend(self, q, k, v, mask, scaling=self.head_dim**-0.5, dropout=0.0)  # out [B, T, H, D]
        return self.o_proj(dropout(self.dropout, out.reshape(B, T, -1))), weights


def causal_padding_mask(Tq: int, Tk: int, attention_mask, device, first=None) -> torch.Tensor:
    """Boolean SDPA mask: key a is visible to query t when a <= t and a is a real token. The queries are positions
    first .. first + Tq - 1 (an int or a tensor; by default the last Tq of the keys). A 4D `attention_mask` (a
    custom one, bool) already says which keys each query sees."""
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask
    else:
        t = torch.arange(Tq, device=device)[:, None] + (Tk - Tq if first is None else first)
        mask = (torch.arange(Tk, device=device)[None, :] <= t)[None, None]  # [1, 1, Tq, Tk]
        if attention_mask is not None:
            mask = mask & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    # A pad query before any real token sees no key; SDPA would return NaN. Let it see every key instead:
    # its output is never used (its own position is masked everywhere downstream) but stays finite.
    return mask | ~mask.any(-1, keepdim=True)


def flex_block_mask(mask: torch.Tensor):
    """The boolean mask [B or 1, 1, Tq, Tk] as a FlexAttention `BlockMask`: transformers' flex backend adds a dense
    tensor mask to the scores (a boolean one would be added as 0/1), while a block mask is applied as a mask and
    lets the kernel skip fully masked blocks."""
    from torch.nn.attention.flex_attention import create_block_mask

    dense = mask[:, 0]
    per_row = dense.shape[0] > 1

    def visible(b, h, q_idx, kv_idx):
        return dense[b if per_row else 0, q_idx, kv_idx]

    return create_block_mask(visible, dense.shape[0] if per_row else None, None, *dense.shape[1:], device=mask.device)


ATTENTION_CLASSES = {
    "tensor_attention": TensorAttention,
    "full_attention": StandardAttention,
    "poly_tensor_attention": PolyTensorAttention,
}


class TensorAttnDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: TensorAttnConfig, layer_idx: int):
        super().__init__()
        self.self_attn = ATTENTION_CLASSES[config.layer_types[layer_idx]](config, layer_idx)
        self.mlp = TensorAttnMLP(config)
        self.input_layernorm = TensorAttnRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = TensorAttnRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, past_key_values=None,
                output_attentions=False, documents=None):
        # The model passes the cache under the name the installed transformers uses (compat item 1), the one
        # `GradientCheckpointingLayer` drops under gradient checkpointing; transformers 5.23 says `past_key_values`.
        cache = cache if cache is not None else past_key_values
        residual = hidden_states
        hidden_states, attention_weights = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            output_attentions=output_attentions,
            documents=documents,
        )
        hidden_states = residual + dropout(self.dropout, hidden_states)
        residual = hidden_states
        hidden_states = residual + dropout(self.dropout, self.mlp(self.post_attention_layernorm(hidden_states)))
        return hidden_states, attention_weights


def replaced_by_a_save(name: str) -> bool:
    """Files of an earlier save that a model save rewrites in full: weights and remote code (not tokenizer files)."""
    return bool(MODEL_WEIGHT_FILES.match(name) or remote_code.CODE_FILES.match(name))


class TensorAttnPreTrainedModel(PreTrainedModel):
    config_class = TensorAttnConfig
    config: TensorAttnConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TensorAttnDecoderLayer"]
    _skip_keys_device_placement = [compat.CACHE_ARG]  # accelerate's device hooks must not move the cache
    _supports_sdpa = True
    _supports_flex_attn = True
    # torch.compile(model, fullgraph=True) with every default layout, and the static layout's decode step as one graph
    # (tests/cache/test_static.py); tensor layers do not go through ALL_ATTENTION_FUNCTIONS (_supports_attention_backend)
    _can_compile_fullgraph = True
    # attn_implementation picks the standard layers' kernel; tensor layers always run ops.tensor_attention.
    supported_attn_implementations = ("sdpa", "eager", "flex_attention")

    def __init__(self, config: TensorAttnConfig, *args, **kwargs):
        # Fields assigned after the config was built (config.score_scale = ...) have not been validated yet.
        if isinstance(config, TensorAttnConfig):
            config.validate()
        super().__init__(config, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, self_contained: bool | None = None, **kwargs):
        """`PreTrainedModel.save_pretrained`, crash-safe: written into a temporary folder beside `save_directory`
        and swapped in only when complete (`hf_tensor_attn.atomic`), so a failed save leaves the previous
        checkpoint loadable. Saves that several processes write together (not `is_main_process`,
        `distributed_checkpoint`) go straight to the folder, as in transformers.

        `self_contained=True` also writes the package's code into the folder (`hf_tensor_attn.remote_code`), so
        `trust_remote_code=True` loads it where only torch and transformers are installed; by default the folder
        points to the installed package. A model card (README.md) is written unless the folder has one."""
        self_contained = remote_code.resolve(self_contained, save_directory)
        with remote_code.saving(self_contained):  # the config's own save, inside super(), writes the code
            if not kwargs.get("is_main_process", True) or kwargs.get("distributed_checkpoint", False):
                return super().save_pretrained(save_directory, *args, **kwargs)
            hub = compat.create_repo(kwargs, save_directory) if kwargs.pop("push_to_hub", False) else None
            with atomic_directory(save_directory, replaced=replaced_by_a_save) as staging:
                super().save_pretrained(staging, *args, **kwargs)
                if model_card.ours(Path(save_directory) / model_card.FILE_NAME):  # the user's own card stays
                    card = model_card.render(self.config, hub["repo_id"] if hub else str(save_directory),
                                             remote_code.package_version(), self_contained, self.model_tags)
                    (staging / model_card.FILE_NAME).write_text(card, encoding="utf-8")
                if hub is not None:  # pushed here, not by super(): its push would upload a generic card instead
                    compat.upload_folder(self, staging, **hub)

    def push_to_hub(self, repo_id: str, *, self_contained: bool | None = None, commit_message: str | None = None,
                    commit_description: str | None = None, private: bool | None = None, token=None,
                    revision: str | None = None, create_pr: bool = False, max_shard_size="50GB",
                    tags: list[str] | None = None) -> None:
        """`PushToHubMixin.push_to_hub`, uploading our model card (transformers' would replace it by a generic one)
        and, with `self_contained=True`, the package's code (`save_pretrained` explains both)."""
        if tags:
            self.add_model_tags(tags)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, push_to_hub=True, repo_id=repo_id, self_contained=self_contained,
                                 commit_message=commit_message, commit_description=commit_description,
                                 private=private, token=token, revision=revision, create_pr=create_pr,
                                 max_shard_size=max_shard_size)

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs):
        """Refuse, at load time and by name, the attention kernels this model cannot use (compat item 6)."""
        if attn_implementation is not None and attn_implementation not in self.supported_attn_implementations:
            # Opens with transformers' own wording for an unknown implementation, which its tests and users match.
            raise ValueError(
                f'Specified `attn_implementation="{attn_implementation}"` is not supported. tensor_attn models support '
                f"attn_implementation in {list(self.supported_attn_implementations)}: it selects the kernel of the "
                "standard ('full_attention') layers, 'sdpa' by default, 'eager' to return attention weights (tensor "
                "layers then return theirs too), 'flex_attention' for torch's FlexAttention; tensor layers otherwise "
                "always use hf_tensor_attn.ops.tensor_attention (pair attention has no such kernel)"
            )
        return super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, **kwargs)
    register_for_auto_class = compat.keep_own_auto_map  # compat item 5

    @classmethod
    def prepare_distribute_model(cls, distributed_config, device_map=None):
        """Refuse pipeline parallelism by name before transformers builds a device mesh (compat item 7)."""
        compat.refuse_pipeline_parallel(distributed_config)
        return super().prepare_distribute_model(distributed_config, device_map)

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, mesh_manager):
        """Check that each rank gets whole heads before transformers shards the model (compat item 7)."""
        compat.check_tensor_parallel_heads(model.config, distributed_config)
        if model.config.tensor_kv2_bias and (getattr(distributed_config, "tp_size", None) or 1) > 1:
            # The plans shard projections by module; the k2 / v2 bias parameters would stay whole on every rank.
            raise ValueError(
                f"tensor parallelism (tp_size={distributed_config.tp_size}) does not yet split the `tensor_kv2_bias` "
                "parameters k2_bias / v2_bias of a converted model; use tp_size=1 (FSDP works) for this model"
            )
        return super().maybe_distribute_model(model, distributed_config, mesh_manager)

    def _init_weights(self, module):
        super()._init_weights(module)
        # The rotary table is a non-persistent buffer: recompute it when weights are initialised off the meta device.
        if isinstance(module, TensorAttnRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.config))
        if isinstance(module, TensorAttention) and module.k2_bias is not None:
            init.zeros_(module.k2_bias)
            init.zeros_(module.v2_bias)


class TensorAttnModel(TensorAttnPreTrainedModel):
    def __init__(self, config: TensorAttnConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([TensorAttnDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = TensorAttnRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = TensorAttnRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.config_at_build = config.fixed_at_build()  # a later change of these is refused by forward
        self.post_init()

    @staticmethod
    def check_cache(cache, config) -> None:
        """A cache passed in must be ours and built for this model: other caches have no tensor-attention layers."""
        if cache is None:
            return
        if not isinstance(cache, TensorAttnCache):
            raise TypeError(
                f"tensor-attention models need a TensorAttnCache, got {type(cache).__name__}: pass "
                "hf_tensor_attn.TensorAttnCache(model.config, cache_implementation=...) as `cache=`, or let the model "
                "build one (use_cache=True, or generate(cache_implementation=...))"
            )
        # What it compares is fixed at the model's build, which forward checks first: a cache that passed for this
        # config object passes again, and every eager decode step would pay for the comparison (a compiled graph
        # holds no such state; it runs the check when traced).
        if torch.compiler.is_compiling():
            cache.check_built_for(config)
        elif cache.checked_for is not config:
            cache.check_built_for(config)
            cache.checked_for = config
        if torch.compiler.is_compiling() and not cache.traceable:
            raise ValueError(f"cache_implementation={cache.cache_implementation!r} cannot be filled inside a compiled "
                             "graph (it reads counts on the host); compile with 'four_cache' or 'static_four_cache', "
                             "or run this layout uncompiled")

    def custom_mask(self, mask, B: int, T: int, cached: bool, documents) -> torch.Tensor:
        """A 4D `attention_mask` [B or 1, 1, T, T] as transformers' models take it (bool or integer: nonzero means
        allowed; floating: additive, 0 allowed) -> bool. Query t of a tensor layer uses the pairs of tokens it may
        see (windows still count along the row); layers keep causality. Without a cache, and not with poly layers,
        whose prefix sums cannot leave tokens out per query."""
        if mask.shape[0] not in (1, B) or tuple(mask.shape[1:]) != (1, T, T):
            raise ValueError(f"a 4D `attention_mask` must be [batch or 1, 1, tokens, tokens] = [{B}, 1, {T}, {T}], got "
                             f"shape {tuple(mask.shape)}")
        if cached or documents is not None:
            raise ValueError("a 4D `attention_mask` (the allowed keys of each query) works without a cache and "
                             "without packed-sequence keywords: pass use_cache=False")
        if "poly_tensor_attention" in self.config.layer_types:
            raise ValueError("a 4D `attention_mask` is not supported by 'poly_tensor_attention' layers (their state "
                             "sums every earlier token); pass a 2D padding mask")
        return mask == 0 if mask.is_floating_point() else mask.bool()

    def forward(
        self, input_ids: torch.LongTensor | None = None, *, attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
        output_hidden_states: bool | None = None, output_attentions: bool | None = None,
        return_dict: bool | None = None, past_key_values: Cache | None = None, **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Like `LlamaModel.forward`, with every argument after `input_ids` by keyword. `past_key_values` is the name
        transformers < 5.24 gives `cache`. `kwargs` are transformers' extra forward keywords as classified in
        `compat.FORWARD_KWARGS` (the loss ones are ignored here, as in Llama); any other raises `TypeError`."""
        compat.check_forward_kwargs(kwargs, f"{type(self).__name__}.forward()")
        cache = compat.resolve_cache(cache, past_key_values, f"{type(self).__name__}.forward")
        if not torch.compiler.is_compiling():
            self.config.check_unchanged_since(self.config_at_build)
        self.check_cache(cache, self.config)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of `input_ids` or `inputs_embeds`")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if inputs_embeds.dim() != 3 or 0 in inputs_embeds.shape[:2]:
            name, given = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
            raise ValueError(f"`{name}` must hold at least one token of at least one sequence ([batch, tokens"
                             f"{'' if name == 'input_ids' else ', hidden'}]), got shape {tuple(given.shape)}")
        # Packed sequences (documents side by side in a row, no padding): every layer attends within a document. As
        # transformers' masks, restarting positions count only without a mask and a cache (a decode step has none).
        documents = compat.packed_documents(kwargs, position_ids if cache is None else None, attention_mask,
                                            tuple(inputs_embeds.shape[:2]))
        if documents is not None and (cache is not None or use_cache):
            raise ValueError("a packed batch (cu_seq_lens_q, seq_idx, or position_ids that restart without an "
                             "attention_mask) cannot use a cache: pass use_cache=False, or one document per row")
        custom = attention_mask is not None and attention_mask.dim() == 4
        if use_cache is None:
            # Training never reuses a cache: building one would only hold activations alive. Compiled, a layout that
            # cannot be filled inside a graph (`TensorAttnCacheLayer.traceable`) is not built unasked.
            use_cache = self.config.use_cache and not self.training and documents is None and not custom and not (
                torch.compiler.is_compiling() and not LAYOUTS[self.config.default_cache_implementation].traceable)
        if use_cache and cache is None:
            cache = TensorAttnCache(self.config)

        B, T = inputs_embeds.shape[:2]
        # A static layout counts its tokens in a tensor (a compiled step must not specialise on the count).
        past_seen = cache.get_seq_length() if cache is not None else 0
        width = cache.max_cache_len if cache is not None and cache.max_cache_len else None  # a static mask's
        if not torch.compiler.is_compiling() and int(past_seen) + T > self.config.max_position_embeddings:
            logger.warning_once(  # one message per process: the same text is not repeated
                f"Inputs run past max_position_embeddings={self.config.max_position_embeddings}, the positions this "
                "model was built for; positions beyond it were never trained and outputs may degrade."
            )
        if custom:
            attention_mask = self.custom_mask(attention_mask, B, T, cache is not None or use_cache, documents)
        elif attention_mask is not None:
            if width is not None and attention_mask.dim() == 2 and not torch.compiler.is_compiling() and (
                    attention_mask.shape[1] == int(past_seen) + T):
                attention_mask = cache.full_width(attention_mask)
            if attention_mask.dim() != 2 or attention_mask.shape != (B, width or past_seen + T):
                expected = (f"[batch, max_cache_len] = {(B, width)} or [batch, past + new tokens]" if width else
                            f"[batch, past + new tokens] = {(B, past_seen + T)}")
                raise ValueError(f"`attention_mask` must be a 2D {expected} 0/1 mask, got shape "
                                 f"{tuple(attention_mask.shape)}")
            # Nothing padded: the masks reduce to causality and the ops take their unpadded path. Reading the mask's
            # values is a data-dependent branch, which a compiled graph cannot hold: compiled, the mask is kept.
            if not torch.compiler.is_compiling() and bool(attention_mask.all()):
                attention_mask = None
        if position_ids is None:
            if documents is not None:  # cu_seq_lens / seq_idx alone: each document counts from 0, as alone
                steps = torch.arange(T, device=inputs_embeds.device).expand(B, T)
                starts = torch.ones_like(documents, dtype=torch.bool)
                starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
                position_ids = steps - torch.where(starts, steps, 0).cummax(-1).values
            elif attention_mask is not None and not custom:
                # Count only real tokens, so a left-padded row gets the positions it would have alone.
                counts = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                new = torch.arange(T, device=counts.device) + past_seen  # a static mask runs past the new tokens
                position_ids = counts[:, -T:] if width is None else counts.index_select(1, new)
            else:
                position_ids = (torch.arange(T, device=inputs_embeds.device) + past_seen)[None].expand(B, -1)
        elif position_ids.shape[-1] != T:
            raise ValueError(f"`position_ids` must hold one position per new token, [batch, {T}], got shape "
                             f"{tuple(position_ids.shape)}")

        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        hidden_states = inputs_embeds
        all_hidden_states, all_attentions = [], []
        position_embeddings = rotary_tables(*self.rotary_emb(hidden_states, position_ids))
        for layer in self.layers:
            all_hidden_states.append(hidden_states)
            hidden_states, attention_weights = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                output_attentions=output_attentions,
                documents=documents,
                **compat.cache_kwargs(cache),
            )
            if output_attentions:
                all_attentions.append(attention_weights)  # None under SDPA / flex (see eager_tensor_attention)
        hidden_states = self.norm(hidden_states)
        all_hidden_states.append(hidden_states)
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            **compat.cache_kwargs(cache),
        )
        return output if return_dict is not False else output.to_tuple()


class TensorAttnForCausalLM(TensorAttnPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # The head's share of the tensor-parallel plan (the base model's is in TensorAttnConfig), as in Llama. Unlike
    # Llama, no FSDP rule for the head: with it and the tied embedding (our default), transformers 5.24 wraps the
    # embedding as a unit of its own, and training left the single-process losses from the second step on (the
    # first gradients agreed; an untied model agreed throughout). Without the rule, the tied weight sits in the root
    # unit and FSDP2 training matches one process (tests/training/test_parallel.py).
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # Trainer passes `num_items_in_batch` when this is set (compat.FORWARD_KWARGS lists every extra keyword).
    accepts_loss_kwargs = True

    def __init__(self, config: TensorAttnConfig):
        super().__init__(config)
        self.model = TensorAttnModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Like `LlamaForCausalLM.forward`. `past_key_values` is the name transformers < 5.24 gives `cache`;
        `kwargs` are transformers' extra forward keywords as classified in `compat.FORWARD_KWARGS` (`shift_labels`
        and `num_items_in_batch` go to the loss); any other raises `TypeError`."""
        loss_kwargs = compat.check_forward_kwargs(kwargs, f"{type(self).__name__}.forward()")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            past_key_values=past_key_values,  # resolved once, by the base model
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            **kwargs,  # as Llama: the base model honours the packed-sequence keys and ignores the loss ones
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **compat.cache_kwargs(compat.output_cache(outputs)),
        )
        return output if return_dict is not False else output.to_tuple()

    def generate(self, *args, cache_implementation=None, cache_config=None, **kwargs):
        """`GenerationMixin.generate`, plus the tensor-attention cache layouts.

        The layout is the first of: `cache_implementation` (a name from `available_cache_implementations()`,
        options in `cache_config`), the passed `generation_config`'s, `model.generation_config`'s (saved in
        generation_config.json), `config.default_cache_implementation`. "dynamic" means the config's default;
        "offloaded" the same, offloaded to the CPU between layers. The name becomes a cache object here, before the
        base `generate` would build a cache of its own from it. A cache passed in (`cache=`, or `past_key_values=`
        before transformers 5.24) is used as it is.
        """
        cache = compat.resolve_cache(kwargs.pop("cache", None), kwargs.pop("past_key_values", None), "generate()")
        ids, mask = (args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))), kwargs.get("attention_mask")
        if isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.shape != ids.shape:
            # Else the base generate derives positions from the mask and fails inside the rotary embedding.
            raise ValueError(f"`attention_mask` must have the shape of `input_ids` {tuple(ids.shape)} (1 for real "
                             f"tokens, 0 for padding), got {tuple(mask.shape)}")
        if cache is not None and cache_implementation is not None:
            raise ValueError(
                f"generate() got both a cache object and cache_implementation={cache_implementation!r}; pass one: "
                "the cache object is used as it is, the name builds a new cache"
            )
        passed = kwargs.get("generation_config")
        configs = [c for c in (passed, self.generation_config) if c is not None]
        name = cache_implementation or next((c.cache_implementation for c in configs if c.cache_implementation), None)
        cache_config = cache_config or next((c.cache_config for c in configs if c.cache_config), None)
        offloading = name == "offloaded"
        if name in (None, "dynamic", "offloaded"):
            name = self.config.default_cache_implementation
        elif name == "static":  # transformers' name for buffers allocated once
            name = "static_four_cache"
        elif name not in LAYOUTS:
            raise ValueError(
                f"`cache_implementation` must be one of {available_cache_implementations()}, or 'dynamic' (the "
                f"config's default layout), 'offloaded' or 'static' ('static_four_cache'); got {name!r}"
            )
        if LAYOUTS[name].is_compileable and not (cache_config or {}).get("max_cache_len"):
            cache_config = {**(cache_config or {}), "max_cache_len": self._static_cache_length(ids, kwargs, configs)}
        use_cache = kwargs.get("use_cache", (passed or self.generation_config).use_cache)
        if cache is None and use_cache is not False:
            cache = TensorAttnCache(self.config, name, cache_config, offloading=offloading)
        if cache is not None:
            kwargs.update(compat.cache_kwargs(cache))
        return super().generate(*args, **kwargs)

    def _static_cache_length(self, ids, kwargs, configs) -> int:
        """Tokens a static cache must hold for this call: the prompt and the new tokens, as transformers sizes its
        `StaticCache` (at least `generation_config.max_cache_len` when set)."""
        config = configs[0]
        prompt = ids.shape[-1] if isinstance(ids, torch.Tensor) else kwargs["inputs_embeds"].shape[1]
        max_new = kwargs.get("max_new_tokens", config.max_new_tokens)
        length = prompt + max_new if max_new is not None else kwargs.get("max_length", config.max_length)
        return max(length, getattr(config, "max_cache_len", None) or 0)

    def create_masks_for_generate(self, *, attention_mask=None, **kwargs):
        """What `generate` passes as the mask with a compileable cache (transformers builds a 4D one there): the 2D
        mask this model takes, padded with zeros to the static cache's width, so every decode step has one shape."""
        cache = kwargs.get(compat.CACHE_ARG)
        return cache.full_width(attention_mask) if isinstance(cache, TensorAttnCache) else attention_mask

    def _prepare_generation_config(self, generation_config, **kwargs):
        # The base generate fills the call's config from the model's, layout name included, and then refuses it
        # beside the cache object `generate` built from that name: clear it on the merged copy (compat item 10).
        return compat.without_cache_implementation(super()._prepare_generation_config(generation_config, **kwargs))


__all__ = ["TensorAttnForCausalLM", "TensorAttnModel", "TensorAttnPreTrainedModel"]
