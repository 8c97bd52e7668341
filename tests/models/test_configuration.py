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
