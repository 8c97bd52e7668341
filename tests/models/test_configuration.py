"""TensorAttnConfig: derived defaults, strict validation naming the field, round trips."""

import re

import pytest
from transformers import AutoConfig

from hf_tensor_attn import TensorAttnConfig


def test_defaults_are_derived():
    config = AutoConfig.for_model("tensor_attn", hidden_size=96, num_attention_heads=4, num_hidden_layers=3)
    assert isinstance(config, TensorAttnConfig)
    assert config.head_dim == 24
    assert config.layer_types == ["tensor_attention"] * 3
    assert config.score_scale == pytest.approx(24**-0.5)
    assert config.intermediate_size % 8 == 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("w1", 0),
        ("w2", -3),
        ("layer_types", ["tensor_attention", "mamba"]),
        ("position_embedding_type", "alibi"),
        ("score_scale", -1.0),
        ("attention_dropout", 1.0),
        ("default_cache_implementation", "paged"),
        ("num_attention_heads", 0),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(field, value):
    kwargs = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        TensorAttnConfig(**kwargs)


def test_layer_types_length_must_match():
    with pytest.raises(ValueError, match="layer_types"):
        TensorAttnConfig(num_hidden_layers=3, layer_types=["tensor_attention"] * 2)


def test_odd_head_dim_with_rope_is_rejected():
    with pytest.raises(ValueError, match="head_dim"):
        TensorAttnConfig(hidden_size=30, num_attention_heads=2)
    TensorAttnConfig(hidden_size=30, num_attention_heads=2, position_embedding_type="none")


def test_config_round_trip(tmp_path):
    config = TensorAttnConfig(num_hidden_layers=2, layer_types=["full_attention", "tensor_attention"], w1=8, w2=4)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}
    assert strip(loaded.to_dict()) == strip(config.to_dict())


# Issue #15: every float finite and in range, bools refused where numbers are meant.
@pytest.mark.parametrize(
    "field, value",
    [
        ("score_scale", float("inf")),  # every logit was NaN
        ("score_scale", 1e300),
        ("score_scale", True),  # failed later as "`scale` must be a float"
        ("score_scale", float("nan")),
        ("rope_theta", float("inf")),
        ("rope_theta", 0.0),
        ("rope_theta", True),
        ("rms_norm_eps", float("inf")),
        ("rms_norm_eps", 0.0),
        ("rms_norm_eps", 1e39),  # past float32: the norm would divide by inf
        ("attention_dropout", float("nan")),
        ("hidden_dropout", True),
        ("initializer_range", float("inf")),
        ("initializer_range", -0.1),
        ("num_hidden_layers", True),
        ("w1", True),
        ("attention_bias", 1),
        ("tie_word_embeddings", "yes"),
        ("pad_token_id", 300),
        ("bos_token_id", -1),
    ],
)
def test_out_of_range_values_are_refused_naming_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"`{field}` must be .*got {re.escape(repr(value))}"):
        TensorAttnConfig(**{**dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2), field: value})


def test_norm_epsilon_of_one_is_accepted():
    """transformers' common tests set every norm epsilon to 1.0 (`set_config_for_less_flaky_test`)."""
    config = TensorAttnConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, rms_norm_eps=1.0)
    config.validate()
    assert config.rms_norm_eps == 1.0


def test_layer_types_string_is_refused_by_name():
    """It used to print a list of single characters."""
    with pytest.raises(ValueError, match=r"`layer_types` must be a list .* got the string 'tensor_attention'"):
        TensorAttnConfig(num_hidden_layers=2, layer_types="tensor_attention")


def test_unknown_keyword_warns_with_the_closest_field():
    from hf_tensor_attn.configuration import UnknownConfigKeyWarning

    with pytest.warns(UnknownConfigKeyWarning, match=r"\['scor_scale'\].*did you mean 'score_scale'"):
        TensorAttnConfig(num_hidden_layers=1, scor_scale=0.5)


def test_saved_config_loads_without_unknown_key_warnings(tmp_path):
    import warnings

    TensorAttnConfig(num_hidden_layers=1).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoConfig.from_pretrained(tmp_path)


def test_values_changed_after_construction_are_checked_when_the_model_is_built():
    from transformers import AutoModelForCausalLM

    config = TensorAttnConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2)
    config.score_scale = float("inf")
    with pytest.raises(ValueError, match="`score_scale` must be"):
        AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("output_bias", [True, False])
def test_every_layer_types_output_projection_follows_attention_output_bias(output_bias):
    """Qwen2-style q/k/v biases without an o bias (or the reverse) hold in tensor, poly and standard layers alike."""
    from transformers import AutoModelForCausalLM

    layer_types = ["tensor_attention", "poly_tensor_attention", "full_attention"]
    config = AutoConfig.for_model("tensor_attn", hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                  vocab_size=259, layer_types=layer_types, attention_bias=not output_bias,
                                  attention_output_bias=output_bias)
    model = AutoModelForCausalLM.from_config(config)
    for layer in model.model.layers:
        attention = layer.self_attn
        assert (attention.o_proj.bias is not None) == output_bias, type(attention).__name__
        assert (attention.q_proj.bias is not None) == (not output_bias), type(attention).__name__


def test_poly_degree_past_the_feature_guard_is_refused_with_the_largest_allowed():
    """poly_degree=40 (377M features per head at width 8) was accepted."""
    from hf_tensor_attn.configuration import MAX_POLY_FEATURES
    from hf_tensor_attn.ops.poly.common import MAX_FEATURES

    assert MAX_POLY_FEATURES == MAX_FEATURES
    with pytest.raises(ValueError, match=r"`poly_degree`=40 with poly_feature_dim=8 .*use poly_degree <= 16"):
        TensorAttnConfig(num_hidden_layers=1, poly_degree=40)


# Issue #35: config values validated at every use.
@pytest.mark.parametrize(
    "rope_parameters, match",
    [
        ({"rope_type": "linear", "factor": 0.0}, r"`rope_parameters\['factor'\]` must be a finite number >= 1.*got 0.0"),
        ({"rope_type": "linear", "factor": float("nan")}, r"`rope_parameters\['factor'\]` must be .*got nan"),
        ({"rope_type": "linear", "factor": -1.0}, r"`rope_parameters\['factor'\]` must be .*got -1.0"),
        ({"rope_type": "linear", "factor": "2"}, r"`rope_parameters\['factor'\]` must be .*got '2'"),
        ({"rope_type": "linear"}, r"`rope_parameters` of rope_type 'linear' needs the keys \['factor'\], missing"),
        ({"rope_type": "llama3", "factor": 8.0},
         r"rope_type 'llama3' needs the keys .*missing \['low_freq_factor', 'high_freq_factor'\]"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
          "original_max_position_embeddings": 64}, r"`rope_parameters\['high_freq_factor'\]` must be > low_freq"),
        ({"rope_type": "dynamic", "factor": 2.0}, r"`rope_parameters\['rope_type'\]` must be one of"),
        (5, r"`rope_parameters` must be None or a dict .*got 5"),
    ],
)
@pytest.mark.parametrize("position_embedding_type", ["rope", "none"])
def test_bad_rope_parameters_are_refused_by_key(rope_parameters, match, position_embedding_type):
    """A factor of 0 or NaN made every logit NaN, -1 only logged a line, a missing factor was a KeyError, 5 a
    TypeError."""
    from hf_tensor_attn.configuration import TensorAttnConfigError

    with pytest.raises(TensorAttnConfigError, match=match):
        TensorAttnConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, rope_parameters=rope_parameters,
                         position_embedding_type=position_embedding_type)


def test_rope_parameters_changed_in_place_are_refused_when_the_model_is_built():
    from transformers import AutoModelForCausalLM

    config = TensorAttnConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                              rope_parameters={"rope_type": "linear", "factor": 2.0})
    config.rope_parameters["factor"] = 0.0
    with pytest.raises(ValueError, match=r"`rope_parameters\['factor'\]` must be .*got 0.0"):
        AutoModelForCausalLM.from_config(config)
    from hf_tensor_attn.compat import rope_frequencies

    with pytest.raises(ValueError, match=r"`rope_parameters\['factor'\]`"):
        rope_frequencies(config)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("eos_token_id", "x", r"`eos_token_id` must be None or a token id .* or a non-empty list of them, got 'x'"),
        ("eos_token_id", float("nan"), r"`eos_token_id` must be .*got nan"),
        ("eos_token_id", True, r"`eos_token_id` must be .*got True"),
        ("eos_token_id", [2, "a"], r"`eos_token_id` must be .*got \[2, 'a'\]"),
        ("eos_token_id", [], r"`eos_token_id` must be .*got \[\]"),
        ("eos_token_id", 259, r"`eos_token_id` must be below vocab_size=259, got 259"),
        ("bos_token_id", 259, r"`bos_token_id` must be below vocab_size=259, got 259"),
        ("hidden_act", "foo", r"`hidden_act` must be one of transformers' activations \[.*'silu'.*\], got 'foo'"),
        ("layer_types", 5, r"`layer_types` must be a list with entries in .*got 5"),
    ],
)
def test_token_ids_activation_and_layer_types_are_refused_by_name(field, value, match):
    """eos_token_id "x", NaN and True were accepted (generate then failed or used token 1); hidden_act="foo" was a
    bare KeyError at build; layer_types=5 a TypeError."""
    from hf_tensor_attn.configuration import TensorAttnConfigError

    with pytest.raises(TensorAttnConfigError, match=match):
        TensorAttnConfig(**{**dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2), field: value})


def test_a_list_of_eos_token_ids_is_accepted():
    assert TensorAttnConfig(num_hidden_layers=1, eos_token_id=[1, 2]).eos_token_id == [1, 2]


@pytest.mark.parametrize("field, value", [("w1", 2), ("score_scale", 0.5), ("layer_types", ["full_attention"]),
                                          ("poly_degree", 4), ("tensor_rope_streams", ["q", "k1"])])
def test_config_changed_after_the_model_was_built_is_refused_by_forward_and_generate(field, value):
    """After `m.config.w1 = 2` the cached and uncached paths differed by 1e-2: the layers kept w1 = None while each
    new cache read 2. Either path now refuses the change by name, and works again once it is set back."""
    import torch
    from transformers import AutoModelForCausalLM

    config = TensorAttnConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    before = getattr(model.config, field)
    setattr(model.config, field, value)
    for run in (lambda: model(ids, use_cache=False), lambda: model(ids),
                lambda: model.generate(ids, max_new_tokens=2, do_sample=False)):
        with pytest.raises(ValueError, match=rf"`config.{field}` was changed from .* to {re.escape(repr(value))} "
                                             "after the model was built"):
            run()
    setattr(model.config, field, before)
    model.generate(ids, max_new_tokens=2, do_sample=False)


def test_invalid_value_assigned_to_a_live_config_is_refused_by_generate():
    """`m.config.score_scale = -1.0` then generate ran without error."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(TensorAttnConfig(num_hidden_layers=1, hidden_size=32,
                                                              num_attention_heads=2)).eval()
    model.config.score_scale = -1.0
    with pytest.raises(ValueError, match=r"`score_scale` must be 0 < score_scale <= 1e3 .*got -1.0"):
        model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2)
