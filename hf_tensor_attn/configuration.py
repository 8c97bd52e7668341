"""Configuration of tensor-attention causal language models."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import PreTrainedConfig

from . import compat
from .cache import available_cache_implementations
from .ops.backend import check_backend

LAYER_TYPES = ("tensor_attention", "full_attention")
POSITION_EMBEDDING_TYPES = ("rope", "none")


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
        head_dim (`int`, *optional*): width of each head; defaults to `hidden_size // num_attention_heads`.
        layer_types (`list[str]`, *optional*): per layer, `"tensor_attention"` or `"full_attention"` (standard
            softmax attention through SDPA). Defaults to all `"tensor_attention"`. A hybrid stack such as
            Roy et al.'s one tensor layer in four is a change of this list.
        score_scale (`float`, *optional*): multiplies the trilinear scores `<q, k1 * k2>`. Defaults to
            `1 / sqrt(head_dim)` (Roy et al. 2025); Alman & Song use `1 / head_dim`.
        w1 (`int`, *optional*): window of the first key stream: query t uses k1_a only when `t - a < w1`.
            `None` means the whole causal past.
        w2 (`int`, *optional*): window of the second key stream (`t - b < w2`), as `w1`.
        position_embedding_type (`str`, defaults to `"rope"`): `"rope"` rotates q and keys by position in every
            layer (in tensor layers q, k1 and k2); `"none"` uses no positional encoding (causality alone).
        rope_theta (`float`, defaults to 10000.0): base of the rotary frequencies.
        max_position_embeddings (`int`, defaults to 2048): longest sequence the model is meant for.
        hidden_act (`str`, defaults to `"silu"`): activation of the gated MLP.
        rms_norm_eps (`float`, defaults to 1e-6): epsilon of the RMS norms.
        attention_dropout (`float`, defaults to 0.0): dropout on the attention output (training only).
        hidden_dropout (`float`, defaults to 0.0): dropout on the residual branches (training only).
        initializer_range (`float`, defaults to 0.02): std of the normal weight initialisation.
        attention_bias (`bool`, defaults to False): biases in the q/k/v/o projections.
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

    vocab_size: int = 259
    hidden_size: int = 256
    intermediate_size: int | None = None
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    head_dim: int | None = None
    layer_types: list[str] | None = None
    score_scale: float | None = None
    w1: int | None = None
    w2: int | None = None
    position_embedding_type: str = "rope"
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    initializer_range: float = 0.02
    attention_bias: bool = False
    default_cache_implementation: str = "four_cache"
    tensor_attention_backend: str | None = None
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        if self.head_dim is None and isinstance(self.hidden_size, int) and isinstance(self.num_attention_heads, int):
            if self.num_attention_heads > 0:
                self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None and isinstance(self.hidden_size, int):
            self.intermediate_size = 8 * ((8 * self.hidden_size // 3 + 7) // 8)
        if self.layer_types is None and isinstance(self.num_hidden_layers, int):
            self.layer_types = ["tensor_attention"] * self.num_hidden_layers
        if self.score_scale is None and isinstance(self.head_dim, int) and self.head_dim > 0:
            self.score_scale = self.head_dim**-0.5
        super().__post_init__(**kwargs)

    register_for_auto_class = compat.keep_own_auto_map  # compat item 5

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

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        compat.write_remote_module(save_directory)

    def validate_layer_type(self):
        """Our layer types are not in transformers' closed list, so this validator replaces the base one."""
        if not isinstance(self.layer_types, list) or any(t not in LAYER_TYPES for t in self.layer_types):
            raise ValueError(f"`layer_types` must be a list with entries in {list(LAYER_TYPES)}, got {self.layer_types!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"`layer_types` has {len(self.layer_types)} entries but `num_hidden_layers` is {self.num_hidden_layers}; "
                "give one type per layer"
            )

    def validate_architecture(self):
        """Part of `@strict` validation: every field in its allowed range."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        for name in ("w1", "w2"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be None (whole causal past) or an int >= 1, got {value!r}")
        if not isinstance(self.score_scale, (int, float)) or not self.score_scale > 0:
            raise ValueError(f"`score_scale` must be a positive float (default 1/sqrt(head_dim)), got {self.score_scale!r}")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"`position_embedding_type` must be one of {list(POSITION_EMBEDDING_TYPES)}, "
                f"got {self.position_embedding_type!r}"
            )
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise ValueError(f"`head_dim` must be even with rotary position embeddings, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"`rope_theta` must be > 0, got {self.rope_theta!r}")
        for name in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"`rms_norm_eps` must be > 0, got {self.rms_norm_eps!r}")
        if self.initializer_range < 0:
            raise ValueError(f"`initializer_range` must be >= 0, got {self.initializer_range!r}")
        if self.default_cache_implementation not in available_cache_implementations():
            raise ValueError(
                f"`default_cache_implementation` must be one of {available_cache_implementations()}, "
                f"got {self.default_cache_implementation!r}"
            )
        check_backend(self.tensor_attention_backend, "tensor_attention_backend")


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
compat.allow_layer_type("tensor_attention")

__all__ = ["TensorAttnConfig", "TensorAttnConfigError"]
