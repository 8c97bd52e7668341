"""TensorAttnConfig: derived defaults, strict validation naming the field, round trips."""

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
