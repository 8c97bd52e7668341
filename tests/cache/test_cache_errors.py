"""Clear errors for caches used the wrong way (issue #15): each names the argument, the value and what is allowed,
where it used to be a TypeError about dict sequences, an AttributeError, a RuntimeError or a CUDA assertion."""

from __future__ import annotations

import pytest
import torch

from hf_tensor_attn import TensorAttnCache

IDS = torch.tensor([[5, 6, 7]])


def test_cache_config_string_is_refused_with_the_allowed_keys(make_model):
    """It gave "dictionary update sequence element #0"."""
    model = make_model()
    with pytest.raises(TypeError, match=r"`cache_config` must be a dict .* got the str 'delta=0.5'; keys of "
                                        r"cache_implementation='subgen4': \['delta'"):
        model.generate(IDS, max_new_tokens=2, cache_implementation="subgen4", cache_config="delta=0.5")


def test_a_cache_built_for_other_layer_types_is_refused(make_model):
    model = make_model()
    other = make_model(layer_types=["full_attention", "tensor_attention"]).config
    with pytest.raises(ValueError, match=r"built for layer_types=\['full_attention', 'tensor_attention'\]"):
        model.generate(IDS, max_new_tokens=2, cache=TensorAttnCache(other))


@pytest.mark.parametrize("layer_types", [None, ["full_attention", "tensor_attention"]])
def test_a_cache_filled_by_a_wider_model_is_refused(make_model, layer_types):
    """Same layer types and score scale, another width: it used to fail deep inside as a shape or cat error."""
    extra = {} if layer_types is None else {"layer_types": layer_types}
    narrow = make_model(score_scale=0.25, **extra)
    wide = make_model(score_scale=0.25, hidden_size=64, **extra)
    cache = TensorAttnCache(wide.config)
    wide(IDS[:, :2], cache=cache)
    wide(IDS[:, 2:], cache=cache)  # a step of the model it passed for: not compared again (`checked_for`)
    assert cache.checked_for is wide.config
    for _ in range(2):  # a refusal is not remembered as a pass
        with pytest.raises(ValueError, match=r"holds states of width \d+ in layer 0, but the model's layer 0 uses"):
            narrow(IDS, cache=cache)


def test_a_cache_needs_a_config():
    with pytest.raises(TypeError, match=r"`config` must be the model's TensorAttnConfig .* got None"):
        TensorAttnCache(None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_offloaded_on_a_cpu_only_machine_is_refused_by_name(make_model):
    """It failed with "Torch not compiled with CUDA enabled"."""
    model = make_model()
    with pytest.raises(ValueError, match=r"cache_implementation='offloaded'.* no CUDA device.*'dynamic'"):
        model.generate(IDS, max_new_tokens=2, cache_implementation="offloaded")
