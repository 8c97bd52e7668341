"""Everything hf_tensor_attn relies on in transformers beyond its documented public API, in one place.

Each item names the transformers behaviour it depends on; `tests/test_compat.py` has one test per item that fails
loudly when upstream changes it. The package is tested on transformers OLDEST_TESTED .. NEWEST_TESTED (both
pinned in CI); importing it with a newer minor release warns once.

Items:
 1. The cache keyword. transformers 5.24 renamed `past_key_values` to `cache` in model forwards, model outputs
    and `generate()`; 5.23 uses the old name. Our modules take both (`resolve_cache`) and pass the one the
    installed version uses (`CACHE_ARG`), e.g. to `GradientCheckpointingLayer`, which drops exactly that keyword
    under gradient checkpointing.
 2. Layer types. `PreTrainedConfig.validate_layer_type` accepts only names in
    `configuration_utils.ALLOWED_ATTN_LAYER_TYPES`, read at call time. Our config overrides the validator, but
    transformers also reads our config.json with the base class (`Trainer(resume_from_checkpoint=...)`), so
    `allow_layer_type` appends our name to that tuple. `StaticCache(config=...)` looks each layer type up in
    `cache_utils.STATIC_LAYER_TYPE_MAPPING` (a bare `KeyError` for ours); `refuse_static_cache` maps our types to a
    factory that raises by name until a static layer class registers itself there (its `_layer_type`).
 3. `cache_implementation`. `GenerationConfig.validate` accepts only names in
    `generation.configuration_utils.ALL_CACHE_IMPLEMENTATIONS` (plus "paged"), read at call time, and runs on
    construction, `save_pretrained` and `from_pretrained`. `allow_cache_implementation` appends each registered
    layout name, so `GenerationConfig(cache_implementation="two_cache")` and a `generation_config.json` naming a
    layout work; `TensorAttnForCausalLM.generate` turns the name into a cache object before the base `generate`
    builds anything from it.
 4. Cache layers. `TensorAttnCache` is a `Cache` built from a list of layers: ours (`CacheLayerMixin`
    subclasses) and transformers' `DynamicLayer`. We rely on `Cache.update(k, v, layer_idx, **kwargs)` passing
    keyword arguments through to the layer's `update` (and doing the offloading around it), on `Cache`'s length,
    beam and batch methods delegating to each layer, and on `crop(n)` taking a negative count.
 5. Remote code. The loaders for `trust_remote_code=True` call `register_for_auto_class()` on the class they
    load; `save_pretrained` then copies that class's source file (with its relative imports) next to the
    weights. Our classes come from the installed package and write their own one-line loader module instead
    (`REMOTE_MODULE`), so they turn that registration into a no-op (`keep_own_auto_map`). A self-contained save
    (`hf_tensor_attn.remote_code`) relies on how `dynamic_module_utils` finds what to copy (`from .NAME import`
    lines, `get_relative_import_files`) and checks imports (`get_imports`). `PreTrainedModel.save_pretrained(
    push_to_hub=True)` uploads a generic model card over ours, so our save pushes itself (`create_repo`,
    `upload_folder`) with `hf_api().create_repo` and `PushToHubMixin._upload_modified_files(folder, repo_id,
    files_timestamps, ...)`.
 6. Attention kernels. `PreTrainedModel._check_and_adjust_attn_implementation(attn_implementation, is_init_check,
    ...)` validates `attn_implementation` at init and in `set_attn_implementation`; our model overrides it to
    refuse kernels its standard layers cannot use with a message that names the ones they can. Standard layers
    call `ALL_ATTENTION_FUNCTIONS["sdpa" | "flex_attention"]` with transformers' signature `(module, q, k, v,
    mask, scaling=, dropout=)`, returning ([B, T, H, D], weights); the flex backend gets a torch `BlockMask`
    (a dense tensor there is added to the scores). tests/models/test_transformers_api.py checks both.
    With fewer key/value heads than query heads the interface reads `module.num_key_value_groups` and repeats
    the key/value heads itself (`repeat_kv`), as for Llama. Standard layers pick their function with
    `ALL_ATTENTION_FUNCTIONS.get_interface(name, eager_attention)`: `set_attn_implementation` switches a model only
    when `PreTrainedModel._can_set_attn_implementation` finds that call in the source of the module defining its
    attention classes (otherwise it logs and changes nothing). Our refusal of an unknown name opens with
    transformers' own wording ('Specified `attn_implementation="..."` is not supported'), which its tests match.
 7. Distributed plans. `from_pretrained(..., distributed_config=DistributedConfig(...))` (transformers.distributed)
    merges the config's `base_model_tp_plan` / `base_model_fsdp_plan` with the head class's `_tp_plan` /
    `_fsdp_plan` (`DistributedMixin.init_parallel_plans`), adds `embed_tokens: embedding_rowwise`, and looks the
    style names up in `ALL_PARALLEL_STYLES` / `ALL_FSDP_STYLES`. With tied embeddings it drops the embedding's FSDP
    rule and, when the head has a `keep_full_weight` rule, gives the embedding that rule instead; training then
    diverged from one process (measured on 5.24), so our head declares no FSDP rule and the tied weight
    stays in the root unit. Colwise outputs reach the attention as local tensors holding this rank's heads.
    Pipeline stages replace absent decoder layers by an identity returning the hidden states alone, where ours
    return (hidden_states, weights), and `pp_size` is not checked against a plan; `from_pretrained` asks the model
    class first through `prepare_distribute_model`, where ours refuses `pp_size > 1` (`refuse_pipeline_parallel`),
    then shards the built model through `maybe_distribute_model`, where ours first checks that `tp_size` divides
    the head counts (`check_tensor_parallel_heads`; transformers itself would cut a head between ranks).
 8. Trainer checkpoints. `Trainer._save_checkpoint(model, trial)` writes checkpoint `f"{PREFIX_CHECKPOINT_DIR}-{step}"`
    (model, optimizer.pt, scheduler.pt, rng_state*.pth, trainer_state.json) into the folder that
    `self._get_output_dir(trial=trial)` returns, then rotates old checkpoints there. `save_checkpoint_staged` points
    that folder at a staging folder for the call and renames the finished checkpoint into the run folder, so a
    folder named checkpoint-N is always complete. `get_last_checkpoint` would pick a partial folder, and
    `Trainer._load_optimizer_and_scheduler` silently skips missing files; `training.resolve_checkpoint` chooses and
    checks instead, by the file names below.
 9. RoPE parameters. A config with a `rope_parameters` attribute gets it filled by `PreTrainedConfig.__post_init__`
    (`convert_rope_params_to_dict`: "rope_type" and "rope_theta" from our `rope_theta` field; "llama3" / "yarn"
    also get "original_max_position_embeddings") and checked by the base `validate_rope`. The frequencies of each
    type come from `modeling_rope_utils.ROPE_INIT_FUNCTIONS[type](config)` -> (inv_freq, attention_scaling), the
    functions `LlamaRotaryEmbedding` uses; `rope_frequencies` calls them, so a converted Llama gets its exact tables.
    Only types whose frequencies do not change with the sequence length are allowed (`STATIC_ROPE_TYPES`):
    "dynamic" and "longrope" recompute them from the longest position seen, which a cache would have to track.
10. The generation config merge. `GenerationMixin.generate` calls `self._prepare_generation_config(generation_config,
    **kwargs)` -> (generation_config, model_kwargs): a copy of the call's config whose unset fields are filled
    from `model.generation_config`, so the model's `cache_implementation` comes back there, and the base then
    refuses a cache object passed beside a `cache_implementation`. `TensorAttnForCausalLM.generate` has already
    turned the name into a cache object; its `_prepare_generation_config` clears the name on that merged copy
    (`without_cache_implementation`), so `model.generation_config` is never changed while a call runs.
11. Forward keywords. transformers' models take `**kwargs: Unpack[TransformersKwargs]` (`utils.generic`) besides
    their named parameters; trainers and `generate` pass some of those keys, and `generate` also passes on its
    `tokenizer` (for stop strings; `_extract_generation_mode_kwargs` hands it to the decoding loop, whose model
    kwargs reach `forward`). Our forwards take `**kwargs` too, but every key must be classified in
    `FORWARD_KWARGS` (honoured, knowingly ignored, or refused with a reason); any other raises `TypeError` naming
    it (`check_forward_kwargs`). The loss keys go to transformers' `ForCausalLMLoss` as Llama passes them.
12. PEFT defaults (peft, not transformers). `LoraConfig()` without `target_modules` takes the module names from
    `peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[config.model_type]` (LoraModel's
    `target_module_mapping`), a table of transformers' own model types. `register_peft_lora_targets` adds ours
    when peft is installed (importing `peft.utils.constants` costs about a second, once).
13. Assistant token masks. `apply_chat_template(..., tokenize=True, return_dict=True,
    return_assistant_tokens_mask=True)` renders the template's {% generation %} spans as character spans, then
    maps them to tokens through a fast tokenizer's encodings: 5.24 marks the tokens of `out.encodings[i].offsets`
    that overlap them, 5.23 asks `out.char_to_token(i, char)`, which calls `encodings[i].char_to_token(char, 0)`.
    Our byte tokenizer has no such encodings: for the duration of that call its `__call__` attaches `ChatOffsets`
    objects that answer both, and the returned encoding has none again.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from transformers import cache_utils as _cache_utils
from transformers import configuration_utils as _config_utils
from transformers.generation import configuration_utils as _generation_config_utils
from transformers import PreTrainedModel
from transformers import trainer as _trainer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import hub as hub_utils
from transformers.utils import logging

logger = logging.get_logger(__name__)

OLDEST_TESTED = "5.23.0"
NEWEST_TESTED = "5.24.0"


class UntestedTransformersWarning(UserWarning):
    """The installed transformers is newer than the newest release this package was tested with."""


def check_transformers_version(installed: str = transformers.__version__) -> None:
    """Warn once when `installed` is a newer minor release than NEWEST_TESTED (patch releases are trusted)."""
    newest = Version(NEWEST_TESTED).release[:2]
    if Version(installed).release[:2] > newest:
        warnings.warn(
            f"hf_tensor_attn was tested with transformers {OLDEST_TESTED} to {NEWEST_TESTED}; the installed "
            f"transformers {installed} is newer. If generation or training misbehaves, install the tested version: "
            f"pip install 'transformers=={NEWEST_TESTED}'.",
            UntestedTransformersWarning,
            stacklevel=3,
        )


# ---- 1. the cache keyword ----

LEGACY_CACHE_ARG = "past_key_values"
# The name the installed transformers passes a cache under (generate -> forward, decoder layers) and stores it in
# model outputs. Model outputs are transformers' dataclasses, so their field list is the authority.
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else LEGACY_CACHE_ARG


def resolve_cache(cache, past_key_values, where: str):
    """The cache given as `cache=` or as the older `past_key_values=`; both at once is an error.

    On transformers releases that already renamed it, the old name logs one deprecation message per process, as
    transformers' own models do; on older releases it is the current name and stays silent.
    """
    if past_key_values is None:
        return cache
    if cache is not None:
        raise TypeError(f"{where} got both `cache` and `past_key_values`; pass the cache once, as `cache=`")
    if CACHE_ARG != LEGACY_CACHE_ARG:
        logger.warning_once(
            f"`past_key_values` is deprecated since transformers 5.24; {where} takes it as `cache=` (same object)"
        )
    return past_key_values


def cache_kwargs(cache) -> dict:
    """`{name: cache}` under the name the installed transformers uses, for calls into its classes."""
    return {CACHE_ARG: cache}


def output_cache(output):
    """The cache a model output (or `generate(..., return_dict_in_generate=True)` output) carries."""
    return getattr(output, CACHE_ARG)


# ---- 2. layer types ----


def allow_layer_type(name: str) -> None:
    """Let transformers' base-config validator accept `name` in `layer_types` (it reads the tuple at call time)."""
    if name not in _config_utils.ALLOWED_ATTN_LAYER_TYPES:
        _config_utils.ALLOWED_ATTN_LAYER_TYPES = (*_config_utils.ALLOWED_ATTN_LAYER_TYPES, name)
        _config_utils.ALLOWED_LAYER_TYPES = (*_config_utils.ALLOWED_LAYER_TYPES, name)


def refuse_static_cache(layer_type: str) -> None:
    """Make `StaticCache(config=...)` refuse `layer_type` layers by name; a class registered for it stays."""
    mapping = getattr(_cache_utils, "STATIC_LAYER_TYPE_MAPPING", None)
    if isinstance(mapping, dict):
        mapping.setdefault(layer_type, functools.partial(_no_static_layer, layer_type))


def _no_static_layer(layer_type: str, **kwargs):
    raise ValueError(
        f"transformers' StaticCache has no layer for {layer_type!r} layers, which `config.layer_types` of this "
        "tensor_attn model names; pass hf_tensor_attn.TensorAttnCache(model.config, cache_implementation=NAME) as "
        "`cache=`, or call generate(cache_implementation=NAME), with NAME from "
        "hf_tensor_attn.cache.available_cache_implementations()"
    )


# ---- 3. cache_implementation ----


def allow_cache_implementation(name: str) -> None:
    """Let `GenerationConfig` validate `name` as a cache implementation (it reads the tuple at call time)."""
    if name not in _generation_config_utils.ALL_CACHE_IMPLEMENTATIONS:
        _generation_config_utils.ALL_CACHE_IMPLEMENTATIONS = (*_generation_config_utils.ALL_CACHE_IMPLEMENTATIONS, name)


# ---- 5. remote code ----

# The module `save_pretrained` writes next to the weights; config.json's and tokenizer_config.json's `auto_map`
# point to it, so `trust_remote_code=True` loads the installed package in a process that never imported it.
REMOTE_MODULE = "tensor_attn_remote"
REMOTE_MODULE_SOURCE = '''"""Loads tensor-attention models saved by hf_tensor_attn: the code is the installed package, not this file."""

try:
    import hf_tensor_attn
except ImportError as error:
    raise ImportError(
        "This checkpoint is a tensor-attention model saved by hf_tensor_attn, which is not installed in this "
        "environment. Get the package in one of these ways, then load again: install a wheel built from its source "
        "(python -m build in a checkout, then pip install dist/hf_tensor_attn-*.whl); pip install "
        "git+<URL of its repository>; pip install -e <path of a checkout>; or ask whoever saved this checkpoint to "
        "save it with save_pretrained(..., self_contained=True), which writes the package's code into the folder "
        "so that trust_remote_code=True needs nothing else."
    ) from error

TensorAttnConfig = hf_tensor_attn.TensorAttnConfig
TensorAttnModel = hf_tensor_attn.TensorAttnModel
TensorAttnForCausalLM = hf_tensor_attn.TensorAttnForCausalLM
TensorAttnByteTokenizer = hf_tensor_attn.TensorAttnByteTokenizer
TensorAttnByteTokenizerFast = hf_tensor_attn.TensorAttnByteTokenizerFast
'''


def write_remote_module(save_directory) -> None:
    (Path(save_directory) / f"{REMOTE_MODULE}.py").write_text(REMOTE_MODULE_SOURCE)


def create_repo(kwargs: dict, save_directory) -> dict:
    """For a model's `save_pretrained(..., push_to_hub=True)`: take the keywords that are for the push out of
    `kwargs` (`PreTrainedModel.save_pretrained` passes all but its own named parameters, and `token`, to
    `create_repo`), create the repository as it does, and return what `upload_folder` needs."""
    own = inspect.signature(PreTrainedModel.save_pretrained).parameters
    hub = {key: kwargs.pop(key) for key in list(kwargs) if key not in own}
    if kwargs.get("token") is not None:
        hub["token"] = kwargs["token"]
    repo_id = hub.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))  # not the staging folder's
    upload = {key: hub.pop(key) for key in UPLOAD_ARGS if key in hub}
    upload["token"] = hub.get("token")
    upload["repo_id"] = hub_utils.hf_api().create_repo(repo_id, exist_ok=True, **hub).repo_id
    return upload


# What `_upload_modified_files` takes besides the folder, the repository and `token`; `PushToHubMixin.push_to_hub`
# passes all four.
UPLOAD_ARGS = ("commit_message", "create_pr", "revision", "commit_description")


def upload_folder(model, folder, repo_id: str, token=None, **upload) -> None:
    """Upload a saved folder as `PreTrainedModel.save_pretrained(push_to_hub=True)` and `push_to_hub` do, without
    first replacing its README.md by a generic model card."""
    model._upload_modified_files(folder, repo_id, {}, token=token, **upload)


def keep_own_auto_map(cls, auto_class=None) -> None:
    """Replaces `register_for_auto_class` on our classes: they are never saved as copied source code."""


keep_own_auto_map = classmethod(keep_own_auto_map)


# ---- 7. distributed plans ----


def refuse_pipeline_parallel(distributed_config) -> None:
    """Raise for `pp_size > 1` (a `DistributedConfig` or its dict): our decoder layers do not fit transformers'
    pipeline stages, which would misread the stand-in layers' outputs rather than fail."""
    if isinstance(distributed_config, dict):
        pp_size = distributed_config.get("pp_size")
    else:
        pp_size = getattr(distributed_config, "pp_size", None)
    if pp_size is not None and pp_size > 1:
        raise ValueError(
            f"tensor_attn models do not support pipeline parallelism, got distributed_config pp_size={pp_size}; use "
            "tp_size (tensor parallel) and/or fsdp_size (FSDP2), see docs/distributed.md"
        )


def check_tensor_parallel_heads(config, distributed_config) -> None:
    """Raise unless `tp_size` divides the attention head counts: the column-wise split of the projections would
    otherwise cut a head between ranks (the attention's reshape would then fail with a bare shape error)."""
    tp_size = getattr(distributed_config, "tp_size", None) or 1
    for name in ("num_attention_heads", "num_key_value_heads"):
        count = getattr(config, name, None)
        if tp_size > 1 and count is not None and count % tp_size:
            raise ValueError(
                f"`{name}`={count} is not a multiple of distributed_config tp_size={tp_size}: tensor parallelism "
                "gives each rank whole attention heads; choose a tp_size that divides it"
            )


# ---- 8. Trainer checkpoints ----

TRAINER_STATE_NAME = _trainer.TRAINER_STATE_NAME
OPTIMIZER_NAME = _trainer.OPTIMIZER_NAME
SCHEDULER_NAME = _trainer.SCHEDULER_NAME
# Where checkpoints are written before they get their final name; no `checkpoint-N` pattern matches it.
CHECKPOINT_STAGING_DIR = ".checkpoint-staging"


def save_checkpoint_staged(trainer, base_save, model, trial) -> None:
    """Run `base_save` (the base `Trainer._save_checkpoint`) into a staging folder, then swap the complete
    checkpoint in under its final name and rotate old checkpoints in the run folder."""
    from .atomic import fsync_tree, swap_in

    run_dir = trainer._get_output_dir(trial=trial)
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    staging_root = os.path.join(run_dir, CHECKPOINT_STAGING_DIR)
    staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
    if trainer.args.should_save:
        shutil.rmtree(staging_root, ignore_errors=True)  # what interrupted saves left, of this step or another
    trainer.accelerator.wait_for_everyone()
    trainer._get_output_dir = lambda trial=None: staging_root  # the instance attribute shadows the method
    try:
        base_save(model, trial)
    finally:
        del trainer._get_output_dir
    trainer.accelerator.wait_for_everyone()  # every process has written its part
    if trainer.args.should_save:
        best = trainer.state.best_model_checkpoint
        if best is not None and os.path.dirname(best) == staging_root:  # this checkpoint is the best: its real name
            trainer.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            trainer.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        fsync_tree(Path(staged))
        swap_in(Path(staged), Path(final))
        shutil.rmtree(staged, ignore_errors=True)  # the older checkpoint of the same step, if there was one
        with contextlib.suppress(OSError):
            os.rmdir(staging_root)  # only when empty
        rotate_checkpoints(output_dir=run_dir, save_total_limit=trainer.args.save_total_limit,
                           best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)
    trainer.accelerator.wait_for_everyone()


# ---- 9. RoPE parameters ----

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# What `ROPE_INIT_FUNCTIONS[type]` reads without a default (a missing one was a bare KeyError at build), as
# transformers' own `_validate_<type>_rope_parameters` list them ("rope_theta" comes from our field).
ROPE_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor",),
}
# Numeric keys and what each must be; transformers only logs a warning for most (a factor of 0 or NaN made every
# logit NaN).
ROPE_NUMBERS = {
    "factor": ("a finite number >= 1 (the context extension ratio)", lambda v: v >= 1),
    "low_freq_factor": ("a finite number > 0", lambda v: v > 0),
    "high_freq_factor": ("a finite number > low_freq_factor", lambda v: v > 0),
    "attention_factor": ("a finite number > 0", lambda v: v > 0),
    "beta_fast": ("a finite number > 0", lambda v: v > 0),
    "beta_slow": ("a finite number > 0", lambda v: v > 0),
    "mscale": ("a finite number > 0", lambda v: v > 0),
    "mscale_all_dim": ("a finite number >= 0", lambda v: v >= 0),
}


def check_rope_parameters(rope_parameters) -> None:
    """Raise ValueError naming the key, its value and what is allowed, for `rope_parameters` the frequencies of
    `rope_frequencies` cannot be computed from, or would come out non-finite or meaningless."""
    if rope_parameters is None:
        return
    if not isinstance(rope_parameters, dict):
        raise ValueError(
            f"`rope_parameters` must be None or a dict such as {{'rope_type': 'linear', 'factor': 2.0}}, got "
            f"{rope_parameters!r}"
        )
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(
            f"`rope_parameters['rope_type']` must be one of {list(STATIC_ROPE_TYPES)} (RoPE with fixed frequencies), "
            f"got {rope_type!r}"
        )
    missing = [key for key in ROPE_REQUIRED_KEYS[rope_type] if key not in rope_parameters]
    if missing:
        raise ValueError(
            f"`rope_parameters` of rope_type {rope_type!r} needs the keys {list(ROPE_REQUIRED_KEYS[rope_type])}, "
            f"missing {missing}; got {rope_parameters!r}"
        )
    for key, (allowed, in_range) in ROPE_NUMBERS.items():
        value = rope_parameters.get(key)
        if value is None and key not in ROPE_REQUIRED_KEYS[rope_type]:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not in_range(
            value
        ):
            raise ValueError(f"`rope_parameters['{key}']` must be {allowed}, got {value!r}")
    if "low_freq_factor" in rope_parameters and rope_parameters.get("high_freq_factor", math.inf) <= (
        rope_parameters["low_freq_factor"]
    ):
        raise ValueError(
            f"`rope_parameters['high_freq_factor']` must be > low_freq_factor={rope_parameters['low_freq_factor']!r}, "
            f"got {rope_parameters['high_freq_factor']!r}"
        )
    original = rope_parameters.get("original_max_position_embeddings")
    if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original < 1):
        raise ValueError(f"`rope_parameters['original_max_position_embeddings']` must be an int >= 1, got {original!r}")


def without_cache_implementation(prepared: tuple) -> tuple:
    """`_prepare_generation_config`'s (generation_config, model_kwargs) with the layout name cleared on the merged
    copy (item 10)."""
    generation_config, model_kwargs = prepared
    generation_config.cache_implementation = generation_config.cache_config = None
    return generation_config, model_kwargs


def rope_frequencies(config) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim / 2] float32, attention_scaling) of the config's RoPE, as `LlamaRotaryEmbedding` computes
    them. The default type is computed here, exactly as transformers' default, so plain configs need no
    `rope_parameters` beyond the type."""
    check_rope_parameters(config.rope_parameters)  # again here: the config may have changed since it was validated
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type == "default":
        exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
        return 1.0 / (config.rope_theta**exponents), 1.0
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
    return inv_freq.to(torch.float32), float(attention_scaling)


# ---- 11. forward keywords ----

# Every keyword a forward takes beyond its named parameters: the keys of TransformersKwargs (the named ones,
# output_attentions, output_hidden_states and position_ids, are parameters of ours) and what generate() and trainers
# add. "loss": honoured by the LM head's loss (transformers' ForCausalLMLoss), ignored by the base model, as Llama does;
# "causal": honoured (this model is causal: True or None, False is refused); "ignored": knowingly, for the reason
# given; "packed": document boundaries of a packed (padding-free) batch, honoured by every layer (`packed_documents`).
FORWARD_KWARGS = {
    "num_items_in_batch": ("loss", "Trainer's token count for the loss under gradient accumulation"),
    "shift_labels": ("loss", "targets already shifted (sequence / context parallel training)"),
    "is_causal": ("causal", "True or None: every layer is causal"),
    "tokenizer": ("ignored", "generate() passes its stop-string tokenizer on to the model"),
    "assistant_tokenizer": ("ignored", "generate() passes its assisted-decoding tokenizer on to the model"),
    "output_router_logits": ("ignored", "no layer has a mixture-of-experts router"),
    "cu_seq_lens_q": ("packed", "document boundaries of a packed row (transformers' flattening collator, TRL)"),
    "cu_seq_lens_k": ("packed", "the same boundaries for the keys (must equal cu_seq_lens_q: no cache)"),
    "max_length_q": ("ignored", "the longest document, a launch size for flash-attention kernels"),
    "max_length_k": ("ignored", "the longest document, a launch size for flash-attention kernels"),
    "seq_idx": ("packed", "document index of every token [batch, tokens]"),
}


def check_forward_kwargs(kwargs: dict, where: str) -> dict:
    """The loss keywords among `kwargs` (the extra keywords of a forward), after checking every key against
    `FORWARD_KWARGS`: an unknown key raises TypeError naming it, a refused one ValueError."""
    unknown = sorted(set(kwargs) - set(FORWARD_KWARGS))
    if unknown:
        raise TypeError(
            f"{where} got unexpected keyword argument(s) {unknown}; besides its named parameters it accepts only "
            f"{sorted(FORWARD_KWARGS)} (hf_tensor_attn.compat.FORWARD_KWARGS says what each does)"
        )
    if kwargs.get("is_causal") is False:
        raise ValueError(f"{where} got is_causal=False: every layer of this model is causal (True or None)")
    return {k: v for k, v in kwargs.items() if FORWARD_KWARGS[k][0] == "loss" and v is not None}


def packed_documents(kwargs: dict, position_ids, attention_mask, shape: tuple[int, int]):
    """[B, T] document ids of a packed batch, or None: from `seq_idx`, `cu_seq_lens_q` (one flattened row, as
    transformers' `DataCollatorWithFlattening` and TRL's packing give it) or, without an attention mask, from
    `position_ids` that restart (transformers' `masking_utils.find_packed_sequence_indices`)."""
    from transformers.masking_utils import find_packed_sequence_indices

    B, T = shape
    if kwargs.get("seq_idx") is not None:
        documents = kwargs["seq_idx"]
        if not isinstance(documents, torch.Tensor) or tuple(documents.shape) != (B, T):
            raise ValueError(f"`seq_idx` must be a [batch, tokens] = {(B, T)} tensor of document ids")
        return documents
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is not None:
        cu_q = cu_k
    if cu_q is not None:
        if cu_k is not None and not torch.equal(cu_k.to(cu_q.device), cu_q):
            raise ValueError("`cu_seq_lens_k` must equal `cu_seq_lens_q`: the keys of a packed batch are its queries")
        if B != 1 or cu_q.dim() != 1 or int(cu_q[0]) != 0 or int(cu_q[-1]) != T:
            raise ValueError(f"`cu_seq_lens_q` must be the cumulative document lengths [0, ..., {T}] of one packed "
                             f"row (batch 1), got {cu_q.tolist() if cu_q.dim() == 1 else tuple(cu_q.shape)} for a "
                             f"batch of shape {(B, T)}")
        positions = torch.arange(T, device=cu_q.device)
        return torch.searchsorted(cu_q[1:].contiguous(), positions, right=True)[None]
    if position_ids is not None and attention_mask is None:
        return find_packed_sequence_indices(position_ids)
    return None


# ---- 12. PEFT defaults ----

# Every projection of both attention kinds (tensor layers' k_proj / v_proj hold both streams); Llama's entry names
# only q_proj and v_proj, PEFT's choice for its smallest default.
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def register_peft_lora_targets(model_type: str) -> None:
    """Give `model_type` PEFT's default LoRA targets, when peft is installed (item 12)."""
    try:  # an optional package (a try block also keeps transformers' remote-code import check from requiring it)
        from peft.utils import constants
    except ImportError:
        return

    constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(model_type, list(LORA_TARGET_MODULES))


# ---- 13. assistant token masks ----


class ChatOffsets:
    """Stands in for a fast tokenizer's encoding where `apply_chat_template` reads `.offsets` or asks
    `char_to_token` (item 13). `offsets`: the (start, end) characters of each token, (0, 0) for padding."""

    def __init__(self, offsets: list[tuple[int, int]]):
        self.offsets = offsets

    def char_to_token(self, char_index: int, sequence_index: int = 0) -> int | None:
        """The first token covering character `char_index`, None when none does (truncated away)."""
        return next((i for i, (start, end) in enumerate(self.offsets) if start <= char_index < end), None)
