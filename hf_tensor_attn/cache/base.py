"""The one protocol every tensor-attention cache layout follows, the registry of layouts, and the `Cache`.

Protocol
--------
A layout is a `TensorAttnCacheLayer` subclass registered with `@register_layout(name)`; `name` is what users pass as
`generate(cache_implementation=name)`, and the keyword arguments of its constructor are the `cache_config` keys.

- **Built knowing the model.** `TensorAttnCache(config, name, cache_config)` builds each tensor layer as
  `Layout(TensorAttnConstants.from_config(config), **cache_config)`: the score scale and the windows w1, w2 are
  fixed for the layer's life and never passed per step.
- **One call per step.** A tensor-attention module calls `out = cache.attend(layer_idx, query, key_states,
  value_states, attention_mask)` once per forward. The cache appends the new tokens to the layer
  (`layer.update`, through `Cache.update` so transformers' offloading still applies) and returns
  `layer.attend(query, attention_mask)`: tensor attention of the last Tq positions over everything the layer
  holds, [B, H, Tq, D]. Keys and values arrive as [B, H_kv, T, 2D]: k1 | k2 and v1 | v2 side by side, with
  H_kv dividing the query heads H (grouped-query attention); a layout stores H_kv heads only.
  `attention_mask` is the [B, seen] 0/1 mask of every position so far, or None when none is padded.
- **What a layout writes.** `allocate` (storage, from the first states), `append` (store new
  tokens), `read` (the attention over what is held), `map_batch` (apply a batch-dimension map to every
  per-sequence tensor: beam reordering, repetition, selection), `move` (to a device: offloading) and
  `memory_bytes`. Length bookkeeping, beam / batch operations, offloading and config checking live here, once.
  `crop` raises unless the layout can undo tokens.

`update` returns the states it was given (the pair `Cache.update` passes on); nothing reads it.
"""

from __future__ import annotations

import inspect
from abc import abstractmethod
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, StaticLayer

from .. import compat
from ..registry import CACHE_IMPLEMENTATIONS
from ..ops.exact.decode import DecodeWorkspace
from ..ops.dispatch import autocast_inputs

LAYOUTS: dict[str, type[TensorAttnCacheLayer]] = {}
# Layer types (other than "tensor_attention" and standard layers) whose cache layer is fixed by the layer itself,
# whatever the chosen layout: layer type -> function of the config building that layer's cache layer.
LAYER_TYPE_CACHES: dict = {}
# What the standard (softmax) layers of a hybrid stack keep: every key and value, or a SubGen summary.
STANDARD_LAYERS = ("exact", "subgen")


def register_layout(name: str):
    """Class decorator: make a `TensorAttnCacheLayer` subclass available as `cache_implementation=name`."""

    def wrap(cls):
        if not (isinstance(cls, type) and issubclass(cls, TensorAttnCacheLayer)):
            raise TypeError(f"@register_layout({name!r}) needs a TensorAttnCacheLayer subclass, got {cls!r}")
        LAYOUTS[name] = cls
        if name not in CACHE_IMPLEMENTATIONS:
            CACHE_IMPLEMENTATIONS.append(name)
        cls.layout_name = name
        compat.allow_cache_implementation(name)  # GenerationConfig / generation_config.json accept the name too
        return cls

    return wrap


def register_layer_type_cache(layer_type: str, build) -> None:
    """Give every `layer_type` layer the cache layer `build(config)`, in any `TensorAttnCache`."""
    LAYER_TYPE_CACHES[layer_type] = build


def available_cache_implementations() -> list[str]:
    return list(LAYOUTS)


@dataclass(frozen=True)
class TensorAttnConstants:
    """What a tensor layer's attention depends on besides its inputs: the score scale, the windows and which
    kernels run it (`backend`, see `ops.backend`)."""

    scale: float
    w1: int | None = None
    w2: int | None = None
    backend: str | None = None

    @classmethod
    def from_config(cls, config) -> TensorAttnConstants:
        return cls(scale=float(config.score_scale), w1=config.w1, w2=config.w2,
                   backend=config.tensor_attention_backend)


class TensorAttnCacheLayer(CacheLayerMixin):
    """Cache of one tensor-attention layer; see the module docstring for the protocol."""

    layout_name: str = ""
    # Key/value streams side by side in the states (k1 | k2); a layer of standard attention has 1.
    stream_count = 2
    # The layer class `cache_config["standard_layers"] = "subgen"` builds for standard layers (None: not offered).
    standard_layer: type | None = None
    is_croppable = False
    is_sliding = False
    # What `crop` says when the layout cannot forget tokens (layouts that can override `crop`).
    why_not_croppable = "it cannot forget tokens once added"
    # True for a layout that replaces exp by another kernel ("poly"): it matches softmax attention only
    # approximately, at every length, so exactness checks across layouts leave it out.
    changes_the_kernel = False
    # Whether `torch.compile` can trace filling and reading the layer (no host reads of values, no data-dependent
    # shapes). A compiled forward that would build a cache of another layout by default builds none.
    traceable = True

    def __init__(self, constants: TensorAttnConstants, **cache_config):
        if not isinstance(constants, TensorAttnConstants):
            raise TypeError(
                f"{type(self).__name__} needs the model's TensorAttnConstants first (e.g. "
                f"TensorAttnConstants.from_config(model.config)), got {constants!r}"
            )
        self.check_cache_config(cache_config)
        super().__init__()
        self.constants = constants
        self.seen = 0  # tokens appended so far (absolute positions 0 .. seen-1)
        # Scratch of one-query steps; a `TensorAttnCache` gives its layers one to share (they run one at a time).
        self.workspace = DecodeWorkspace()

    # ---- options ----

    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        """The `cache_config` keys of this layout: the keyword-only parameters of its constructor."""
        params = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

    @classmethod
    def check_cache_config(cls, cache_config) -> None:
        if not isinstance(cache_config, dict):
            raise TypeError(
                f"`cache_config` must be a dict of options such as {{'delta': 0.5}}, got the {type(cache_config).__name__} "
                f"{cache_config!r}; keys of cache_implementation={cls.layout_name!r}: {list(cls.config_keys()) or 'none'}"
            )
        unknown = sorted(set(cache_config) - set(cls.config_keys()))
        if unknown:
            allowed = list(cls.config_keys()) or "none"
            raise ValueError(
                f"`cache_config` has keys {unknown} that cache_implementation={cls.layout_name!r} does not use; "
                f"allowed keys: {allowed}"
            )

    @classmethod
    def build(cls, constants: TensorAttnConstants, count: int, cache_config: dict) -> list[TensorAttnCacheLayer]:
        """The layers of one cache. Layouts whose layers share state (a memory budget) override this."""
        return [cls(constants, **cache_config) for _ in range(count)]

    # ---- the protocol ----

    def update(self, key_states, value_states, *, attention_mask=None):
        """Append new tokens' k1 | k2 and v1 | v2, [B, H, T, 2D] each; `attention_mask` covers every position."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.check_states(key_states, value_states)
        self.append(key_states, value_states, attention_mask)
        self.advance(key_states.shape[-2])
        return key_states, value_states

    def advance(self, count: int) -> None:
        """Count `count` more tokens as seen (after `append`)."""
        self.seen += count

    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor attention of `query` [B, H, Tq, D] (the last Tq positions seen) over what the layer holds."""
        if not self.is_initialized or self.seen == 0:
            raise ValueError("`attend` needs tokens in the cache: `update` it with the new key/value states first")
        B, H_kv, _, D2 = self.keys.shape
        if not isinstance(query, torch.Tensor) or query.dim() != 4 or query.shape[0] != B or query.shape[1] % H_kv or (
            self.stream_count * query.shape[3] != D2
        ):
            shape = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
            raise ValueError(
                f"`query` must be [B, H, Tq, D] = [{B}, H, Tq, {D2 // self.stream_count}] with H a multiple of the "
                f"{H_kv} key/value heads held, got {shape}"
            )
        if query.shape[2] > self.seen:
            raise ValueError(f"`query` has {query.shape[2]} positions but the cache holds only {self.seen} tokens")
        if attention_mask is not None and (
            not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, self.seen)
        ):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"`attention_mask` must be a [B, seen] = {(B, self.seen)} 0/1 or bool tensor, got {shape}")
        return self.read(query, attention_mask)

    def new_token_mask(self, attention_mask: torch.Tensor, count: int) -> torch.Tensor:
        """The [B, count] entries of `attention_mask` that belong to the next `count` tokens (before `update`)."""
        return attention_mask[:, -count:]

    def check_states(self, key_states, value_states) -> None:
        expected = (self.keys.shape[0], self.keys.shape[1], self.keys.shape[3])
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != expected:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"`{name}` must be [B, H, T, 2D] with (B, H, 2D) = {expected}, got {shape}")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate from the first states (`Cache.early_initialization` calls this with [B, H, 0, 2D] tensors)."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.allocate(key_states, value_states)
        self.is_initialized = True

    # ---- what a layout writes ----

    @abstractmethod
    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate storage from the first states. Every layout keeps the tokens it holds exactly as `self.keys`
        [B, H, L, 2D] (L may be 0), which is where the batch size, heads and width are read from."""

    @abstractmethod
    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, attention_mask) -> None:
        """Store new tokens (positions seen .. seen+T-1); `attention_mask` covers every position including them."""

    @abstractmethod
    def read(self, query: torch.Tensor, attention_mask) -> torch.Tensor:
        """Attention of the last Tq positions over what is held, [B, H, Tq, D] (inputs already checked)."""

    @abstractmethod
    def map_batch(self, fn) -> None:
        """Replace every per-sequence tensor t (batch first) by fn(t)."""

    @abstractmethod
    def move(self, device) -> None:
        """Move every tensor to `device`."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes of tensor storage this layer holds right now."""

    # ---- shared bookkeeping (transformers' CacheLayerMixin API) ----

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.is_initialized:
            self.map_batch(lambda t: t[:0])  # free the storage; the next update allocates anew
        self.is_initialized = False
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.seen == 0:
            return
        idx = beam_idx.to(self.device)
        if not torch.equal(idx, torch.arange(len(idx), device=idx.device)):  # identity: nothing moves
            self.map_batch(lambda t: t.index_select(0, idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.seen:
            self.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.seen:
            self.map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def offload(self):
        if self.is_initialized:
            self.move("cpu")

    def prefetch(self):
        if self.is_initialized:
            self.move(self.device)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError(
            f"cache_implementation={self.layout_name!r} cannot crop: {self.why_not_croppable} (assisted or "
            "contrastive decoding need a croppable layout such as 'four_cache')"
        )

    @staticmethod
    def crop_count(tokens_to_remove: int, seen: int) -> int:
        """Tokens kept after `crop(tokens_to_remove)`: transformers passes a negative count of tokens to drop."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"`crop` takes a negative number of tokens to remove (transformers' convention), got {tokens_to_remove}"
            )
        return max(seen + tokens_to_remove, 0)


def layer_memory_bytes(layer) -> int:
    """Bytes held by any cache layer: a tensor layout reports its own, a standard layer holds keys and values."""
    if isinstance(layer, TensorAttnCacheLayer):
        return layer.memory_bytes()
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))


class TensorAttnCache(Cache):
    """The cache of a tensor-attention model: layout `cache_implementation` for its tensor layers, the layer type's
    own cache layer for types in `LAYER_TYPE_CACHES` (poly layers), transformers' `DynamicLayer` for standard ones
    (or SubGen: `cache_config["standard_layers"] = "subgen"`).

    Args:
        config: the model's `TensorAttnConfig` (its `layer_types`, `score_scale`, `w1`, `w2`).
        cache_implementation: one of `available_cache_implementations()`; defaults to the config's.
        cache_config: options of that layout (e.g. `{"max_memory_bytes": ...}` for `"two_cache"`), and
            `"standard_layers"`: `"exact"` (default, every key and value) or `"subgen"` (a layout that offers it,
            "subgen4" / "subgen2": the standard layers are summarised too, with the same options).
        offloading: keep each layer on the CPU between its uses (transformers' offloaded cache; needs CUDA).
    """

    def __init__(self, config, cache_implementation: str | None = None, cache_config: dict | None = None,
                 offloading: bool = False):
        if not all(hasattr(config, field) for field in ("layer_types", "score_scale", "default_cache_implementation")):
            raise TypeError(
                f"`config` must be the model's TensorAttnConfig (TensorAttnCache(model.config, ...)), got {config!r}"
            )
        if callable(getattr(config, "validate", None)):
            config.validate()  # fields assigned after the config was built (config.score_scale = -1.0) are unchecked
        if offloading and not torch.cuda.is_available():
            raise ValueError(
                "`offloading=True` (cache_implementation='offloaded') moves each layer to the CPU between uses and back "
                "to its CUDA device, but torch sees no CUDA device here; on a CPU-only machine use 'dynamic' or a "
                f"layout from {available_cache_implementations()}"
            )
        name = cache_implementation or config.default_cache_implementation
        if name not in LAYOUTS:
            raise ValueError(f"`cache_implementation` must be one of {available_cache_implementations()}, got {name!r}")
        layout = LAYOUTS[name]
        cache_config = {} if cache_config is None else cache_config
        if isinstance(cache_config, dict) and "standard_layers" in cache_config:
            cache_config = dict(cache_config)
            standard = cache_config.pop("standard_layers")
        else:
            standard = "exact"
        layout.check_cache_config(cache_config)
        if standard not in STANDARD_LAYERS or standard == "subgen" and layout.standard_layer is None:
            offered = [n for n, cls in LAYOUTS.items() if cls.standard_layer is not None]
            raise ValueError(
                f"`cache_config['standard_layers']` must be one of {list(STANDARD_LAYERS)} ('subgen' only with "
                f"cache_implementation in {offered}), got {standard!r} with cache_implementation={name!r}"
            )
        self.max_cache_len = None  # tokens a static layout's buffers hold; None for layouts that grow
        if layout.is_compileable:
            self.max_cache_len = cache_config.get("max_cache_len") or config.max_position_embeddings
            cache_config = {**cache_config, "max_cache_len": self.max_cache_len}
        self.constants = TensorAttnConstants.from_config(config)
        self.layer_types = tuple(config.layer_types)
        tensor_layers = iter(layout.build(self.constants, self.layer_types.count("tensor_attention"), cache_config))

        def standard_layer():
            if layout.is_compileable:
                return StaticLayer(self.max_cache_len)
            if standard == "exact":
                return DynamicLayer()
            return layout.standard_layer(TensorAttnConstants(scale=config.head_dim**-0.5), **cache_config)

        layers = [
            next(tensor_layers) if t == "tensor_attention"
            else LAYER_TYPE_CACHES[t](config) if t in LAYER_TYPE_CACHES
            else standard_layer()
            for t in self.layer_types
        ]
        super().__init__(layers=layers, offloading=offloading)
        workspace = DecodeWorkspace()
        for layer in self.layers:
            if isinstance(layer, TensorAttnCacheLayer):
                layer.workspace = workspace
        self.cache_implementation = name
        self.checked_for = None  # the config object this cache last passed `check_built_for` with (a model's forward)

    def attends(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` computes its own attention (`attend`); False for a `DynamicLayer`."""
        return isinstance(self.layers[layer_idx], TensorAttnCacheLayer)

    def attend(self, layer_idx: int, query, key_states, value_states, attention_mask=None) -> torch.Tensor:
        """Append the new states to layer `layer_idx` and return its attention for `query` (see `attends`)."""
        layer = self.layers[layer_idx]
        attention_mask = self.full_width(attention_mask)
        if attention_mask is not None and self.max_cache_len and not layer.is_compileable:
            # A static cache's mask spans max_cache_len tokens; a layer that grows (a poly layer's state) takes the
            # mask of the tokens it will hold.
            attention_mask = attention_mask[:, : layer.seen + key_states.shape[-2]]
        if attention_mask is not None:
            # Padded tokens never contribute, but a NaN they hold would survive a zero weight (0 * NaN) in layouts
            # that sum or cluster what they hold: such entries are stored as 0. Finite states are stored unchanged.
            new = layer.new_token_mask(attention_mask, key_states.shape[-2])
            padded = ~new.to(device=key_states.device, dtype=torch.bool)[:, None, :, None]  # [B, 1, T, 1]
            key_states, value_states = (
                torch.where(padded & ~torch.isfinite(t), torch.zeros_like(t), t) for t in (key_states, value_states)
            )
        # The door's autocast rule (`ops.dispatch`) for every layout: the states are held, and the maths runs, in the
        # autocast dtype with autocast off.
        (query, key_states, value_states), amp_off = autocast_inputs(query, key_states, value_states)
        with amp_off:
            self.update(key_states, value_states, layer_idx, attention_mask=attention_mask)
            return layer.attend(query, attention_mask)

    def check_built_for(self, config) -> None:
        """Raise ValueError when this cache was built for another model than `config` describes."""
        if self.layer_types != tuple(config.layer_types) or self.constants != TensorAttnConstants.from_config(config):
            raise ValueError(
                f"this TensorAttnCache was built for layer_types={list(self.layer_types)} and {self.constants}, but the "
                f"model has layer_types={list(config.layer_types)} and {TensorAttnConstants.from_config(config)}; "
                "build it with TensorAttnCache(model.config, ...)"
            )
        for idx, layer in enumerate(self.layers):
            # A tensor layer holds k1 | k2 side by side, a standard layer k alone (ours say so in `stream_count`).
            width = config.head_dim * (layer.stream_count if isinstance(layer, TensorAttnCacheLayer) else 1)
            keys = layer.keys if layer.is_initialized else None
            held = keys.shape[-1] if isinstance(keys, torch.Tensor) and keys.dim() == 4 and keys.numel() else width
            if held != width:
                raise ValueError(
                    f"this TensorAttnCache holds states of width {held} in layer {idx}, but the model's layer {idx} "
                    f"uses {width} (head_dim={config.head_dim}): it was filled by another model; build a new one with "
                    "TensorAttnCache(model.config, ...)"
                )

    def full_width(self, attention_mask):
        """A 2D [B, tokens so far] mask padded with zeros to a static layout's width (`max_cache_len`), so that every
        step of a compiled decode sees one shape; any other mask (a growing layout's, a full-width one) as it is."""
        if attention_mask is None or not self.max_cache_len or attention_mask.dim() != 2:
            return attention_mask
        return torch.nn.functional.pad(attention_mask, (0, self.max_cache_len - attention_mask.shape[-1]))

    @property
    def traceable(self) -> bool:
        """Whether `torch.compile` can trace every layer's fill and read (`TensorAttnCacheLayer.traceable`)."""
        return all(getattr(layer, "traceable", True) for layer in self.layers)

    def memory_bytes(self) -> int:
        """Bytes of tensor storage held by all layers."""
        return sum(layer_memory_bytes(layer) for layer in self.layers)
