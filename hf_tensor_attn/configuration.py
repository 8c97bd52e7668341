"""Configuration of tensor-attention causal language models."""

from __future__ import annotations

import copy
import difflib
import math
import os
import warnings

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from . import compat, remote_code
from .atomic import atomic_directory
from .registry import CACHE_IMPLEMENTATIONS, check_backend

LAYER_TYPES = ("tensor_attention", "full_attention", "poly_tensor_attention")
POSITION_EMBEDDING_TYPES = ("rope", "none")
ROPE_STREAMS = ("q", "k1", "k2")
# Keys a saved config.json or transformers itself passes besides the fields; any other unknown keyword is most likely
# a misspelt field, which would otherwise be stored silently and ignored.
KNOWN_EXTRA_KWARGS = frozenset({
    "auto_map", "model_type", "name_or_path", "_name_or_path", "transformers_version", "torch_dtype", "_commit_hash",
    "attn_implementation", "experts_implementation", "output_attentions", "per_layer_config", "num_labels",
})
# The papers use 1/sqrt(head_dim), 1/head_dim or 1. At a scale of 1e3 the softmax over unit-sized features is already
# an argmax in float32 (exp(-1e3 * 0.1) underflows); larger scales only overflow the scores.
MAX_SCORE_SCALE = 1e3
# ops.poly.common.MAX_FEATURES, repeated so that the config needs no import of the ops (a test checks they agree): the most
# monomial features C(poly_feature_dim + poly_degree, poly_degree) a poly layer's state may have per head.
MAX_POLY_FEATURES = 1 << 20
FLOAT32_MAX = 3.4028234663852886e38  # the rotary table and the ops compute in float32 at least
# What the model's layers and rotary table take from the config when they are built, and what a cache built later
# reads again: a change afterwards would give a model and its caches different constants (after `config.w1 = 2`
# the cached and uncached paths differed by 1e-2), so a forward refuses it (`check_unchanged_since`). Fields that
# transformers itself changes on a live model (use_cache, vocab_size on resize, the attention kernel) are not here.
FIXED_AT_BUILD = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "layer_types", "score_scale", "w1", "w2", "poly_feature_dim", "poly_degree", "position_embedding_type",
    "tensor_rope_streams", "rope_theta", "rope_parameters", "hidden_act", "rms_norm_eps", "attention_bias",
    "attention_output_bias", "tensor_kv2_bias", "tensor_attention_backend",
)


@strict
class TensorAttnConfig(PreTrainedConfig):
    r"""
    Configuration of a decoder-only language model whose attention layers are tensor (2-simplicial) attention,
    optionally mixed with standard softmax attention layers.

    Args:
        vocab_size (`int`, defaults to 259): vocabulary size; 259 fits the package's byte tokenizer
            (3 special tokens + 256 bytes).
        hidden_size (`int`, defaults to 256): width of the residual stream.
        intermediate_size (`int`, *optional*): width of the SwiGLU MLP; defaults to `8/3 * hidden_size` rounded up
            to a multiple of 8 (Llama's choice, same parameter count as a 4x GELU MLP).
        num_hidden_layers (`int`, defaults to 4): number of decoder layers.
        num_attention_heads (`int`, defaults to 4): heads per attention layer.
        num_key_value_heads (`int`, *optional*): key/value heads per attention layer (grouped-query attention, as in
            Llama); must divide `num_attention_heads`. In tensor layers the k1, k2, v1 and v2 streams all have this
            many heads, each shared by a group of `num_attention_heads // num_key_value_heads` query heads, and the
            caches hold only these heads. Defaults to `num_attention_heads`.
        head_dim (`int`, *optional*): width of each head; defaults to `hidden_size // num_attention_heads`.
        layer_types (`list[str]`, *optional*): per layer, `"tensor_attention"`, `"full_attention"` (standard
            softmax attention through SDPA) or `"poly_tensor_attention"` (tensor attention with the polynomial
            kernel of Alman & Song, trained as such; linear in the sequence length, constant-memory cache). Defaults
            to all `"tensor_attention"`. A hybrid stack such as Roy et al.'s one tensor layer in four is a change of
            this list.
        poly_feature_dim (`int`, defaults to 8): width f that `"poly_tensor_attention"` layers project q, k1, k2 to
            (values keep `head_dim`); their state holds r = C(f + poly_degree, poly_degree) features per head
            (45 for f = 8, degree 2). Their score scale is `1 / sqrt(f)`; they use no rotary embedding and no
            windows (`w1`, `w2` apply to `"tensor_attention"` layers).
        poly_degree (`int`, defaults to 2): degree of the Taylor polynomial of exp in `"poly_tensor_attention"`
            layers; even, so the kernel is positive for every score (degree 2: 1 + s + s^2/2 >= 1/2).
        score_scale (`float`, *optional*): multiplies the trilinear scores `<q, k1 * k2>`. Defaults to
            `1 / sqrt(head_dim)` (Roy et al. 2025); Alman & Song use `1 / head_dim`.
        w1 (`int`, *optional*): window of the first key stream: query t uses k1_a only when `t - a < w1`.
            `None` means the whole causal past.
        w2 (`int`, *optional*): window of the second key stream (`t - b < w2`), as `w1`.
        position_embedding_type (`str`, defaults to `"rope"`): `"rope"` rotates q and keys by position in every
            layer (in tensor layers q, k1 and k2); `"none"` uses no positional encoding (causality alone).
        tensor_rope_streams (`list[str]`, *optional*): which streams of a tensor layer RoPE rotates, a subset of
            `["q", "k1", "k2"]` (the default). A layer converted from a pretrained model rotates `["q", "k1"]`, so that
            an unrotated k2 of ones leaves the pretrained scores unchanged.
        rope_theta (`float`, defaults to 10000.0): base of the rotary frequencies.
        rope_parameters (`dict`, *optional*): transformers' RoPE parameters (`rope_type` and its keys, as in
            `LlamaConfig`); the types with fixed frequencies are supported: "default", "linear", "llama3", "yarn".
            `rope_theta` fills its "rope_theta".
        max_position_embeddings (`int`, defaults to 2048): longest sequence the model is meant for.
        hidden_act (`str`, defaults to `"silu"`): activation of the gated MLP.
        rms_norm_eps (`float`, defaults to 1e-6): epsilon of the RMS norms.
        attention_dropout (`float`, defaults to 0.0): dropout on the attention output (training only).
        hidden_dropout (`float`, defaults to 0.0): dropout on the residual branches (training only).
        initializer_range (`float`, defaults to 0.02): std of the normal weight initialisation.
        attention_bias (`bool`, defaults to False): biases in the q/k/v/o projections (in tensor layers: q, k1, v1
            and o).
        attention_output_bias (`bool`, *optional*): bias in the o projection; defaults to `attention_bias` (Qwen2 has
            q/k/v biases without one).
        tensor_kv2_bias (`bool`, defaults to False): biases on the k2 and v2 streams of tensor layers, separate
            parameters `k2_bias` / `v2_bias` [num_key_value_heads, head_dim]. A layer converted from a pretrained
            model starts with k2 = v2 = 1 from these biases (zero weights).
        default_cache_implementation (`str`, defaults to `"four_cache"`): KV-cache layout `generate()` uses for tensor
            layers when the call does not name one: one of `"four_cache"`, `"two_cache"`, `"subgen4"`, `"subgen2"`.
        tensor_attention_backend (`str`, *optional*): kernels of the tensor layers (training, prefill and the
            four-cache decode step): `None` picks the Triton kernels for CUDA tensors when `triton` is installed
            and the torch path otherwise; `"torch"` or `"triton"` force one (see `hf_tensor_attn.ops.backend`).
        tie_word_embeddings (`bool`, defaults to True): share the input embedding and the LM head.
        use_cache (`bool`, defaults to True): return a cache from forward for generation.
        pad_token_id / bos_token_id / eos_token_id (`int`, *optional*): special tokens (0, 1, 2 in the byte tokenizer).

    Example:

    ```python
    >>> import hf_tensor_attn
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> config = AutoConfig.for_model("tensor_attn", hidden_size=128, num_hidden_layers=2, num_attention_heads=4)
    >>> model = AutoModelForCausalLM.from_config(config)
    ```
    """

    model_type = "tensor_attn"
    keys_to_ignore_at_inference = [compat.CACHE_ARG]  # Trainer drops the cache from eval outputs
    # What `from_pretrained(..., distributed_config=DistributedConfig(tp_size=..., fsdp_size=...))` applies, as in
    # Llama (docs/distributed.md). Tensor and standard layers both name their projections q/k/v/o_proj, so one plan
    # covers both. Tensor parallelism splits heads: a tensor layer's k_proj / v_proj rows are laid out per head as
    # k1 | k2 (v1 | v2), so a contiguous column split by heads keeps both streams of a head on one rank.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    # FSDP2 units: each decoder layer (what _no_split_modules names) and the embedding, resharded after forward; the
    # final norm keeps its gathered weight for the backward that follows at once. (The tied head: TensorAttnForCausalLM.)
    base_model_fsdp_plan = {
        "embed_tokens": "free_full_weight",
        "layers.*": "free_full_weight",
        "norm": "keep_full_weight",
    }

    vocab_size: int = 259
    hidden_size: int = 256
    intermediate_size: int | None = None
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    layer_types: list[str] | None = None
    score_scale: float | None = None
    w1: int | None = None
    w2: int | None = None
    poly_feature_dim: int = 8
    poly_degree: int = 2
    position_embedding_type: str = "rope"
    tensor_rope_streams: list[str] | None = None
    rope_theta: float = 10000.0
    rope_parameters: dict | None = None
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    initializer_range: float = 0.02
    attention_bias: bool = False
    attention_output_bias: bool | None = None
    tensor_kv2_bias: bool = False
    default_cache_implementation: str = "four_cache"
    tensor_attention_backend: str | None = None
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        # Checked before the base __post_init__, whose legacy remapping would turn a string into a list of its
        # characters, and fail on other types with a bare TypeError (layer_types=5, rope_parameters=5).
        if isinstance(self.layer_types, str):
            _refuse("validate_layer_type", ValueError(
                f"`layer_types` must be a list with one entry per layer, got the string {self.layer_types!r}; write "
                f"[{self.layer_types!r}] * num_hidden_layers"
            ))
        if self.layer_types is not None and not isinstance(self.layer_types, list):
            _refuse("validate_layer_type", ValueError(
                f"`layer_types` must be a list with entries in {list(LAYER_TYPES)}, one per layer, got "
                f"{self.layer_types!r}"
            ))
        if self.rope_parameters is not None and not isinstance(self.rope_parameters, dict):
            try:
                compat.check_rope_parameters(self.rope_parameters)
            except ValueError as cause:
                _refuse("validate_rope", cause)
        self._warn_unknown_kwargs(kwargs)
        if self.head_dim is None and isinstance(self.hidden_size, int) and isinstance(self.num_attention_heads, int):
            if self.num_attention_heads > 0:
                self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.tensor_rope_streams is None:
            self.tensor_rope_streams = list(ROPE_STREAMS)
        if self.attention_output_bias is None:
            self.attention_output_bias = self.attention_bias
        if self.intermediate_size is None and isinstance(self.hidden_size, int):
            self.intermediate_size = 8 * ((8 * self.hidden_size // 3 + 7) // 8)
        if self.layer_types is None and isinstance(self.num_hidden_layers, int):
            self.layer_types = ["tensor_attention"] * self.num_hidden_layers
        if self.score_scale is None and isinstance(self.head_dim, int) and self.head_dim > 0:
            self.score_scale = self.head_dim**-0.5
        super().__post_init__(**kwargs)

    register_for_auto_class = compat.keep_own_auto_map  # compat item 5

    @property
    def poly_score_scale(self) -> float:
        """Score scale of the `"poly_tensor_attention"` layers: 1 / sqrt(poly_feature_dim)."""
        return self.poly_feature_dim**-0.5

    def fixed_at_build(self) -> dict:
        """A copy of the FIXED_AT_BUILD fields, taken when a model is built from this config."""
        return copy.deepcopy({name: getattr(self, name) for name in FIXED_AT_BUILD})

    def check_unchanged_since(self, built: dict) -> None:
        """Raise ValueError naming the first FIXED_AT_BUILD field whose value differs from `built`."""
        # Every FIXED_AT_BUILD field is a plain attribute: read from the instance's dict, not through
        # PreTrainedConfig.__getattribute__ (about a microsecond a field, at every forward).
        held = vars(self)
        for name, value in built.items():
            now = held[name] if name in held else getattr(self, name)
            if now != value:
                raise ValueError(
                    f"`config.{name}` was changed from {value!r} to {now!r} after the model was built: its layers keep "
                    f"{value!r} while a cache built now would read {now!r}. Set it back, or build a model with the new "
                    "value (AutoModelForCausalLM.from_config(config), then load_state_dict(old.state_dict()))"
                )

    @staticmethod
    def _warn_unknown_kwargs(kwargs: dict) -> None:
        from transformers import GenerationConfig

        unknown = sorted(set(kwargs) - KNOWN_EXTRA_KWARGS - set(GenerationConfig._get_default_generation_params()))
        if unknown:
            fields = list(TensorAttnConfig.__dict__["__annotations__"])
            guesses = {key: difflib.get_close_matches(key, fields, n=1) for key in unknown}
            hints = "".join(f" ({key!r}: did you mean {guess[0]!r}?)" for key, guess in guesses.items() if guess)
            warnings.warn(
                f"TensorAttnConfig got unknown keyword(s) {unknown}{hints}, stored but used by nothing; its own fields "
                f"are {fields}, plus those of transformers' PreTrainedConfig",
                UnknownConfigKeyWarning,
                stacklevel=4,
            )

    def to_dict(self) -> dict:
        """The config's fields, plus the `auto_map` that lets `trust_remote_code=True` find the installed package."""
        output = super().to_dict()
        output["auto_map"] = {
            auto_class: f"{compat.REMOTE_MODULE}.{cls}"
            for auto_class, cls in (
                ("AutoConfig", "TensorAttnConfig"),
                ("AutoModel", "TensorAttnModel"),
                ("AutoModelForCausalLM", "TensorAttnForCausalLM"),
            )
        }
        return output

    def save_pretrained(self, save_directory, *args, self_contained: bool | None = None, **kwargs):
        """`PreTrainedConfig.save_pretrained`, crash-safe (`hf_tensor_attn.atomic`), plus the remote-code loader:
        with `self_contained=True` the package's code itself (`hf_tensor_attn.remote_code`)."""
        if kwargs.get("push_to_hub", False):
            kwargs.setdefault("repo_id", os.path.basename(os.path.normpath(save_directory)))  # not the staging name
        with atomic_directory(save_directory, replaced=remote_code.CODE_FILES.match) as staging:
            # before super(), which uploads with push_to_hub
            remote_code.write_loader(staging, self_contained, target=save_directory)
            super().save_pretrained(staging, *args, **kwargs)

    def validate_layer_type(self):
        """Our layer types are not in transformers' closed list, so this validator replaces the base one."""
        if not isinstance(self.layer_types, list) or any(t not in LAYER_TYPES for t in self.layer_types):
            raise ValueError(f"`layer_types` must be a list with entries in {list(LAYER_TYPES)}, got {self.layer_types!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"`layer_types` has {len(self.layer_types)} entries but `num_hidden_layers` is {self.num_hidden_layers}; "
                "give one type per layer"
            )

    def validate_rope(self):
        """Our RoPE check, then the base one (compat item 9) only when the model uses RoPE: a NoPE model may have an
        odd head_dim. The base check only logs most bad values (a factor of 0 made every logit NaN)."""
        compat.check_rope_parameters(self.rope_parameters)
        if self.position_embedding_type == "rope":
            super().validate_rope()

    def validate_architecture(self):
        """Part of `@strict` validation: every field of the right type and in its allowed range."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if isinstance(self.poly_feature_dim, bool) or not isinstance(self.poly_feature_dim, int) or (
            self.poly_feature_dim < 1
        ):
            raise ValueError(f"`poly_feature_dim` must be a positive int, got {self.poly_feature_dim!r}")
        degree = self.poly_degree
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 2 or degree % 2:
            raise ValueError(
                f"`poly_degree` must be an even int >= 2 (an even-degree Taylor polynomial of exp is positive for "
                f"every score, so the trained kernel is a positive weighting), got {degree!r}"
            )
        features = math.comb(self.poly_feature_dim + degree, degree)
        if features > MAX_POLY_FEATURES:
            allowed = max((g for g in range(2, degree, 2)
                           if math.comb(self.poly_feature_dim + g, g) <= MAX_POLY_FEATURES), default=None)
            fix = f"use poly_degree <= {allowed} or a smaller" if allowed else "use a smaller"
            raise ValueError(
                f"`poly_degree`={degree} with poly_feature_dim={self.poly_feature_dim} gives r = {features:,} features "
                f"per head, past the {MAX_POLY_FEATURES:,} a poly layer may hold (memory); {fix} poly_feature_dim"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_key_value_heads` must divide `num_attention_heads` = {self.num_attention_heads} (each key/value "
                f"head serves a group of query heads), got {self.num_key_value_heads}"
            )
        streams = self.tensor_rope_streams
        if not isinstance(streams, list) or any(s not in ROPE_STREAMS for s in streams) or len(set(streams)) < len(streams):
            raise ValueError(
                f"`tensor_rope_streams` must be a list of distinct names from {list(ROPE_STREAMS)} (the streams RoPE "
                f"rotates in tensor layers), got {streams!r}"
            )
        for name in ("w1", "w2"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be None (whole causal past) or an int >= 1, got {value!r}")
        _check_float("score_scale", self.score_scale, "0 < score_scale <= 1e3 (default 1/sqrt(head_dim))",
                     lambda v: 0 < v <= MAX_SCORE_SCALE)
        _check_float("rope_theta", self.rope_theta, "a finite float > 0 that float32 holds (default 10000.0)",
                     lambda v: 0 < v <= FLOAT32_MAX)
        # No bound at 1: a large epsilon only flattens the norm, and transformers' own model tests set it to 1.0
        # (`set_config_for_less_flaky_test`). Above float32's range the norm would divide by inf.
        _check_float("rms_norm_eps", self.rms_norm_eps, "a finite float > 0 that float32 holds (default 1e-6)",
                     lambda v: 0 < v <= FLOAT32_MAX)
        for name in ("attention_dropout", "hidden_dropout"):
            _check_float(name, getattr(self, name), "a probability in [0, 1)", lambda v: 0 <= v < 1)
        _check_float("initializer_range", self.initializer_range, "a finite float >= 0 (default 0.02)",
                     lambda v: v >= 0)
        for name in ("attention_bias", "attention_output_bias", "tensor_kv2_bias", "tie_word_embeddings", "use_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if name == "eos_token_id" and isinstance(value, list) and value else [value]
            for token in ids:
                if value is not None and (isinstance(token, bool) or not isinstance(token, int) or token < 0):
                    allowed = "a token id (int >= 0)" + (" or a non-empty list of them" if name == "eos_token_id" else "")
                    raise ValueError(f"`{name}` must be None or {allowed}, got {value!r}")
                if value is not None and token >= self.vocab_size:
                    raise ValueError(f"`{name}` must be below vocab_size={self.vocab_size}, got {value!r}")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` must be one of transformers' activations {sorted(ACT2FN)}, got "
                             f"{self.hidden_act!r}")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"`position_embedding_type` must be one of {list(POSITION_EMBEDDING_TYPES)}, "
                f"got {self.position_embedding_type!r}"
            )
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise ValueError(f"`head_dim` must be even with rotary position embeddings, got {self.head_dim}")
        rope_parameters = self.rope_parameters or {}
        if rope_parameters.get("rope_theta", self.rope_theta) != self.rope_theta:
            raise ValueError(
                f"`rope_parameters['rope_theta']` = {self.rope_parameters['rope_theta']!r} differs from `rope_theta` = "
                f"{self.rope_theta!r}; give one value"
            )
        if self.default_cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"`default_cache_implementation` must be one of {CACHE_IMPLEMENTATIONS}, "
                f"got {self.default_cache_implementation!r}"
            )
        check_backend(self.tensor_attention_backend, "tensor_attention_backend")


def _refuse(validator: str, cause: ValueError):
    """Raise `cause` as strict validation does (a TensorAttnConfigError wrapping it) from outside the validators."""
    raise TensorAttnConfigError(StrictDataclassClassValidationError(validator, cause)) from cause


def _check_float(name: str, value, allowed: str, in_range) -> None:
    """A real number (int or float, never a bool), finite, and `in_range`; else ValueError naming all three."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not in_range(value):
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")


class UnknownConfigKeyWarning(UserWarning):
    """TensorAttnConfig got a keyword that is no field of it (most likely a misspelt one)."""


class TensorAttnConfigError(StrictDataclassClassValidationError, ValueError):
    """An invalid config value. Catchable as `ValueError` (what the field checks raise) and as the
    `StrictDataclassClassValidationError` that transformers' strict configs raise."""

    def __init__(self, wrapped: StrictDataclassClassValidationError):
        Exception.__init__(self, str(wrapped))


_strict_validate = TensorAttnConfig.validate


def _validate(self) -> None:
    try:
        _strict_validate(self)
    except StrictDataclassClassValidationError as e:
        raise TensorAttnConfigError(e) from e.__cause__


# `@strict` defines `validate` and calls it after __init__; wrapping it keeps its checks and changes only the type.
TensorAttnConfig.validate = _validate

# transformers also reads our config.json with its base class (compat item 2).
for _layer_type in ("tensor_attention", "poly_tensor_attention"):
    compat.allow_layer_type(_layer_type)
    compat.refuse_static_cache(_layer_type)

__all__ = ["TensorAttnConfig", "TensorAttnConfigError", "UnknownConfigKeyWarning"]
