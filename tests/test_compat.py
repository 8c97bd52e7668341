"""One test per transformers behaviour that `hf_tensor_attn.compat` depends on. When one of these fails after a
transformers upgrade, the behaviour changed upstream: update compat.py (and its item) rather than the test."""

from __future__ import annotations

import inspect
import re
import types
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import GenerationConfig, GenerationMixin, LlamaForCausalLM, PreTrainedConfig
from transformers import configuration_utils as config_utils
from transformers.cache_utils import Cache, DynamicLayer

import hf_tensor_attn
from hf_tensor_attn import TensorAttnCache, compat

ROOT = Path(__file__).resolve().parents[1]


# ---- the tested range ----


def test_installed_transformers_is_in_the_tested_range():
    installed = Version(transformers.__version__)
    assert Version(compat.OLDEST_TESTED) <= installed
    assert installed.release[:2] <= Version(compat.NEWEST_TESTED).release[:2]


def test_declared_range_and_pins_agree_with_compat():
    spec = re.search(r'"transformers([^"]*)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f">={compat.OLDEST_TESTED}" in spec, spec
    pins = dict(
        line.split("==") for line in (ROOT / "configs/constraints.txt").read_text().split() if "==" in line
    )
    assert pins["transformers"] == compat.NEWEST_TESTED


def test_newer_transformers_warns_once_naming_both_versions():
    with pytest.warns(compat.UntestedTransformersWarning) as record:
        compat.check_transformers_version("5.99.0")
    assert len(record) == 1
    message = str(record[0].message)
    assert "5.99.0" in message and compat.NEWEST_TESTED in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_transformers_version(compat.NEWEST_TESTED)
        compat.check_transformers_version(compat.OLDEST_TESTED)


# ---- item 1: the cache keyword ----


def test_cache_keyword_is_the_one_transformers_uses_everywhere():
    """generate() hands the cache to forward, Llama's forward takes it and model outputs carry it under one name."""
    prepare = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    assert compat.CACHE_ARG in prepare
    assert compat.CACHE_ARG in inspect.signature(LlamaForCausalLM.forward).parameters
    assert compat.CACHE_ARG in transformers.modeling_outputs.CausalLMOutputWithPast.__dataclass_fields__
    if compat.CACHE_ARG == "cache":
        assert "past_key_values" not in prepare


def test_gradient_checkpointing_layer_drops_the_cache_keyword(make_model):
    """Our model passes the cache to decoder layers under CACHE_ARG so GradientCheckpointingLayer can drop it."""
    model = make_model(dtype=torch.float32)
    model.activation_checkpointing_enable()
    model.train()
    cache = TensorAttnCache(model.config)
    model(torch.randint(3, 259, (1, 5)), labels=torch.randint(3, 259, (1, 5)), cache=cache).loss.backward()
    assert cache.get_seq_length() == 0  # the layers never wrote it: no double update on the backward replay


# ---- item 2: layer types ----


def test_base_config_validator_reads_the_allowed_layer_types_at_call_time(monkeypatch):
    assert "tensor_attention" in config_utils.ALLOWED_ATTN_LAYER_TYPES  # added on import
    config = PreTrainedConfig(layer_types=["tensor_attention"], num_hidden_layers=1)
    config.validate_layer_type()
    without = tuple(t for t in config_utils.ALLOWED_ATTN_LAYER_TYPES if t != "tensor_attention")
    monkeypatch.setattr(config_utils, "ALLOWED_ATTN_LAYER_TYPES", without)
    monkeypatch.setattr(config_utils, "ALLOWED_LAYER_TYPES",
                        tuple(t for t in config_utils.ALLOWED_LAYER_TYPES if t != "tensor_attention"))
    with pytest.raises(Exception, match="tensor_attention"):
        config.validate_layer_type()


# ---- item 3: cache_implementation ----


def test_static_cache_refuses_our_layer_types_by_name(make_model):
    """StaticCache(config=...) indexes STATIC_LAYER_TYPE_MAPPING by layer type: a bare KeyError 'tensor_attention'
    before `refuse_static_cache` (issue #35)."""
    from transformers import StaticCache
    from transformers import cache_utils

    model = make_model(layer_types=["full_attention", "poly_tensor_attention"])
    assert "tensor_attention" in cache_utils.STATIC_LAYER_TYPE_MAPPING
    with pytest.raises(ValueError, match=r"StaticCache has no layer for 'poly_tensor_attention' layers.*"
                                         r"TensorAttnCache\(model.config, cache_implementation=NAME\)"):
        StaticCache(config=model.config, max_cache_len=16)


def test_generation_config_validates_against_the_tuple_we_extend(monkeypatch):
    from transformers.generation import configuration_utils as generation_config_utils

    for name in hf_tensor_attn.available_cache_implementations():
        assert name in generation_config_utils.ALL_CACHE_IMPLEMENTATIONS
        GenerationConfig(cache_implementation=name).validate()
    theirs = tuple(n for n in generation_config_utils.ALL_CACHE_IMPLEMENTATIONS
                   if n not in hf_tensor_attn.available_cache_implementations())
    monkeypatch.setattr(generation_config_utils, "ALL_CACHE_IMPLEMENTATIONS", theirs)
    with pytest.raises(ValueError, match="cache_implementation"):
        GenerationConfig(cache_implementation="two_cache").validate()


# ---- item 4: cache layers ----


def test_cache_passes_keywords_to_layers_and_delegates_bookkeeping():
    seen = {}

    class Recorder(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            seen.update(kwargs)
            return super().update(key_states, value_states)

    cache = Cache(layers=[Recorder(), DynamicLayer()])
    k = torch.randn(2, 1, 3, 4)
    cache.update(k, k, 0, attention_mask="mask")
    assert seen == {"attention_mask": "mask"}
    assert cache.get_seq_length(0) == 3
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.layers[0].keys, k[[1, 0]])
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].keys.shape[0] == 4


def test_dynamic_layer_interface_our_layers_build_on():
    layer = DynamicLayer()
    for name in ("keys", "values", "is_initialized"):
        assert hasattr(layer, name), name
    k = torch.randn(1, 2, 5, 4)
    layer.update(k, k.clone())
    assert layer.is_initialized and layer.get_seq_length() == 5
    layer.crop(-2)  # a negative count removes that many tokens
    assert layer.get_seq_length() == 3
    assert "lazy_initialization" in vars(DynamicLayer)


# ---- item 5: remote code ----


def test_remote_code_loaders_register_the_class_they_load():
    """The loaders call register_for_auto_class (which would make save_pretrained copy our sources); ours no-op it."""
    from transformers.models.auto import auto_factory, configuration_auto, tokenization_auto

    for module in (auto_factory, configuration_auto, tokenization_auto):
        assert "register_for_auto_class" in inspect.getsource(module)
    for cls in (hf_tensor_attn.TensorAttnConfig, hf_tensor_attn.TensorAttnForCausalLM,
                hf_tensor_attn.TensorAttnByteTokenizer):
        cls.register_for_auto_class()
        assert cls._auto_class is None


# ---- item 7: distributed plans ----


@pytest.mark.parametrize("tied", [True, False])
def test_distributed_plans_resolve_as_our_model_expects(make_model, tied):
    """The plans DistributedConfig applies to our model: every projection by heads, the MLPs as Llama's, the vocabulary
    sharded, and under FSDP2 one unit per decoder layer with a tied embedding and head left to the root unit."""
    from transformers.distributed import DistributedConfig
    from transformers.distributed.fsdp import ALL_FSDP_STYLES
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

    model = make_model(layer_types=["tensor_attention", "full_attention"], tie_word_embeddings=tied)
    assert all(style in ALL_PARALLEL_STYLES for style in model.tp_plan.values()), model.tp_plan
    assert all(style in ALL_FSDP_STYLES for style in model.fsdp_plan.values()), model.fsdp_plan
    tp_plan, _, fsdp_plan = model._resolve_parallel_plans(DistributedConfig(tp_size=2, fsdp_size=2))
    for layer in (0, 1):  # a tensor and a standard layer: the same rule names
        prefix = f"model.layers.{layer}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert tp_plan[prefix + name] == "colwise" and tp_plan[prefix + name + ".weight"] == "colwise"
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            assert tp_plan[prefix + name] == "rowwise"
    assert tp_plan["model.embed_tokens"] == "embedding_rowwise"
    assert tp_plan["lm_head"] == "colwise_gather_output"
    expected = {"model.layers.0": "free_full_weight", "model.layers.1": "free_full_weight",
                "model.norm": "keep_full_weight"}
    if not tied:
        expected["model.embed_tokens"] = "free_full_weight"
    assert fsdp_plan == expected


@pytest.mark.parametrize("as_dict", [False, True])
def test_pipeline_parallel_is_refused_by_name_before_any_mesh(make_model, tmp_path, as_dict):
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    make_model(dtype=torch.float32).save_pretrained(tmp_path)
    config = {"pp_size": 2} if as_dict else DistributedConfig(pp_size=2)
    with pytest.raises(ValueError, match="pipeline parallelism, got distributed_config pp_size=2"):
        AutoModelForCausalLM.from_pretrained(tmp_path, distributed_config=config)
    assert not torch.distributed.is_initialized()


def test_tensor_parallel_needs_whole_heads_per_rank(make_model):
    """from_pretrained hands the built model to `maybe_distribute_model`, ours checks the heads before sharding."""
    from transformers import PreTrainedModel
    from transformers.distributed import DistributedConfig

    assert "cls.maybe_distribute_model(model, distributed_config, mesh_manager)" in inspect.getsource(
        PreTrainedModel.from_pretrained
    )
    model = make_model(dtype=torch.float32, hidden_size=36, num_attention_heads=3)
    with pytest.raises(ValueError, match="`num_attention_heads`=3 is not a multiple of distributed_config tp_size=2"):
        type(model).maybe_distribute_model(model, DistributedConfig(tp_size=2), mesh_manager=object())
    assert type(model).maybe_distribute_model(model, DistributedConfig(tp_size=1), mesh_manager=None) is model


# ---- item 8: Trainer checkpoints ----


def test_trainer_save_checkpoint_writes_under_get_output_dir_and_rotates_there():
    from transformers import Trainer, trainer_utils

    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    source = inspect.getsource(Trainer._save_checkpoint)
    # compat.save_checkpoint_staged redirects exactly this call, and renames exactly this folder name.
    assert "run_dir = self._get_output_dir(trial=trial)" in source
    assert 'checkpoint_folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"' in source
    assert "output_dir = os.path.join(run_dir, checkpoint_folder)" in source
    assert "rotate_checkpoints(" in source and "output_dir=run_dir" in source
    assert trainer_utils.PREFIX_CHECKPOINT_DIR == "checkpoint"
    assert "rotate_checkpoints" in dir(trainer_utils)
    assert (compat.TRAINER_STATE_NAME, compat.OPTIMIZER_NAME, compat.SCHEDULER_NAME) == (
        "trainer_state.json", "optimizer.pt", "scheduler.pt")


def test_trainer_would_resume_from_a_partial_checkpoint_without_our_check(tmp_path):
    """Why `training.resolve_checkpoint` exists: upstream picks the highest-numbered folder, complete or not, and
    skips a missing scheduler.pt without a word."""
    from transformers import Trainer
    from transformers.trainer_utils import get_last_checkpoint

    (tmp_path / "checkpoint-100").mkdir()
    (tmp_path / "checkpoint-100" / compat.TRAINER_STATE_NAME).write_text("{}")
    (tmp_path / "checkpoint-200").mkdir()
    assert get_last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-200")
    assert "os.path.isfile(os.path.join(checkpoint, SCHEDULER_NAME))" in inspect.getsource(
        Trainer._load_optimizer_and_scheduler)


def test_sdpa_interface_repeats_key_value_heads_by_num_key_value_groups():
    """Item 6: standard layers with fewer key/value heads rely on the interface reading `module.num_key_value_groups`."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from hf_tensor_attn.modeling import eager_attention
    from hf_tensor_attn.ops.common import repeat_kv

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 3, True, False
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, mask, scaling=0.3, dropout=0.0)
    module.num_key_value_groups = 1
    expected, _ = eager_attention(module, q, repeat_kv(k, 3), repeat_kv(v, 3), mask, scaling=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_rope_parameters_are_filled_by_the_base_config_and_computed_by_transformers_functions():
    """Item 9: PreTrainedConfig fills `rope_parameters` from our `rope_theta`; ROPE_INIT_FUNCTIONS has the static types
    and gives LlamaRotaryEmbedding's tables."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert hf_tensor_attn.TensorAttnConfig(rope_theta=1234.0).rope_parameters == {"rope_type": "default",
                                                                                  "rope_theta": 1234.0}
    assert set(compat.STATIC_ROPE_TYPES) - {"default"} <= set(ROPE_INIT_FUNCTIONS)
    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    for rope in ({"rope_type": "default", "rope_theta": 1e4}, llama3):
        sizes = dict(hidden_size=32, num_attention_heads=4, max_position_embeddings=64, rope_parameters=dict(rope))
        llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, vocab_size=8, intermediate_size=8, **sizes))
        ours = hf_tensor_attn.TensorAttnConfig(rope_theta=rope["rope_theta"], num_hidden_layers=1, **sizes)
        inv_freq, scaling = compat.rope_frequencies(ours)
        assert torch.equal(inv_freq, llama.model.rotary_emb.inv_freq), rope["rope_type"]
        assert scaling == llama.model.rotary_emb.attention_scaling


# ---- item 10: the generation config merge ----


def test_generate_fills_the_calls_config_from_the_models_layout_name_included(make_model):
    """Upstream: unset fields of the call's config come from model.generation_config, cache_implementation too (so
    our override must clear it); ours clears it on the merged copy and leaves the model's config alone."""
    model = make_model()
    model.generation_config.cache_implementation = "two_cache"
    merged, _ = GenerationMixin._prepare_generation_config(model, GenerationConfig(max_new_tokens=2))
    assert merged.cache_implementation == "two_cache"
    mask = torch.ones(1, 3, dtype=torch.long)
    ours, model_kwargs = model._prepare_generation_config(GenerationConfig(max_new_tokens=2), attention_mask=mask)
    assert ours.cache_implementation is None and ours.max_new_tokens == 2 and model_kwargs == {"attention_mask": mask}
    assert model.generation_config.cache_implementation == "two_cache"


# ---- item 6 (set_attn_implementation) and item 11: forward keywords ----


def test_set_attn_implementation_needs_get_interface_in_the_module_source(make_model):
    """Upstream decides whether a model may switch backends by finding `ALL_ATTENTION_FUNCTIONS.get_interface(` in
    the source of the module defining an `*Attention*(nn.Module)` class; without it, it only logs a warning."""
    from transformers import PreTrainedModel

    from hf_tensor_attn import modeling

    source = inspect.getsource(PreTrainedModel._can_set_attn_implementation)
    assert '"ALL_ATTENTION_FUNCTIONS.get_interface(" in code' in source
    assert "ALL_ATTENTION_FUNCTIONS.get_interface(" in inspect.getsource(modeling)
    model = make_model(layer_types=["tensor_attention", "full_attention"])
    assert type(model)._can_set_attn_implementation()
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    # transformers' own wording for an unknown name, which its common tests match; ours follows it.
    with pytest.raises(ValueError, match='Specified `attn_implementation="foo"` is not supported'):
        model.set_attn_implementation("foo")
    assert model.config._attn_implementation == "eager"


def test_every_transformers_forward_keyword_is_classified():
    """A key upstream adds to TransformersKwargs fails here until FORWARD_KWARGS says what the model does with it."""
    from transformers.utils.generic import TransformersKwargs

    named = {"output_attentions", "output_hidden_states", "position_ids"}  # parameters of our forwards
    assert set(TransformersKwargs.__annotations__) - named <= set(compat.FORWARD_KWARGS)
    assert {kind for kind, _ in compat.FORWARD_KWARGS.values()} == {"loss", "causal", "ignored", "packed"}


def test_generate_passes_its_tokenizer_on_to_forward(make_model):
    """Why `tokenizer` is a forward keyword at all: generate(stop_strings=..., tokenizer=...) hands it to forward."""
    from hf_tensor_attn import TensorAttnByteTokenizer

    model = make_model()
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(sorted(kwargs))
        return forward(*args, **kwargs)

    model.forward = spy
    model.generate(torch.randint(3, 259, (1, 4)), max_new_tokens=2, stop_strings=["\x00"],
                   tokenizer=TensorAttnByteTokenizer())
    assert seen and all("tokenizer" in keys for keys in seen)


# ---- item 12: PEFT defaults ----


def test_peft_lora_reads_default_targets_from_the_table_we_extend():
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import LoraModel
    from peft.utils import constants

    assert LoraModel.target_module_mapping is constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    assert constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["tensor_attn"] == compat.LORA_TARGET_MODULES
    config = peft.LoraConfig()
    assert config.target_modules is None
    tuner = types.SimpleNamespace(target_module_mapping=LoraModel.target_module_mapping)  # all the method reads
    prepared = LoraModel._prepare_adapter_config(tuner, config, {"model_type": "tensor_attn"})
    assert prepared.target_modules == set(compat.LORA_TARGET_MODULES)


def test_remote_code_loader_reads_the_import_lines_a_self_contained_save_writes(tmp_path):
    """get_relative_import_files follows `from .NAME import` lines (indented ones too) and only those."""
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    (tmp_path / "entry.py").write_text("from . import hidden as h\nif 0:\n    from .shown import x\n")
    (tmp_path / "shown.py").write_text("try:\n    import not_installed_anywhere\nexcept ImportError:\n    pass\n")
    assert [Path(p).name for p in get_relative_import_files(tmp_path / "entry.py")] == ["shown.py"]
    assert get_imports(tmp_path / "shown.py") == []  # imports inside try blocks are not required


def test_push_helpers_exist_with_the_arguments_we_pass():
    from transformers.utils import hub

    parameters = inspect.signature(hub.PushToHubMixin._upload_modified_files).parameters
    assert list(parameters)[:4] == ["self", "working_dir", "repo_id", "files_timestamps"]
    assert {"token", *compat.UPLOAD_ARGS} <= set(parameters)
    assert callable(hub.hf_api) and "create_repo" in dir(hub.hf_api())


# ---- item 13: assistant token masks ----


def test_assistant_masks_come_from_the_encodings_we_lend():
    """5.24 reads `out.encodings[i].offsets`, 5.23 `out.char_to_token(i, char)`; our ChatOffsets answers both."""
    from transformers import PreTrainedTokenizerBase

    source = inspect.getsource(PreTrainedTokenizerBase.apply_chat_template)
    assert "out.encodings[i].offsets" in source or "out.char_to_token(i, " in source
    offsets = compat.ChatOffsets([(0, 0), (0, 3), (3, 4), (3, 4), (4, 5)])  # pad, "<s>", a 2-byte char, "x"
    assert [offsets.char_to_token(c) for c in range(6)] == [1, 1, 1, 2, 4, None]
