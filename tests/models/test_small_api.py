"""Direct tests of small public pieces the Match3 headline and the cache selection depend on: `answer_accuracy`,
`answer_metrics`, `Match3Task.describe`, `config.default_cache_implementation`, the "dynamic" alias of
`generate(cache_implementation=...)` and `register_layout`."""

import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import EvalPrediction, GenerationConfig

from hf_tensor_attn.cache import FourCacheLayer, TensorAttnCache, TwoCacheLayer
from hf_tensor_attn.cache.base import LAYOUTS, TensorAttnCacheLayer, available_cache_implementations, register_layout
from hf_tensor_attn.compat import output_cache
from hf_tensor_attn.data import IGNORE_INDEX, Match3Task, answer_accuracy
from hf_tensor_attn.training import answer_metrics

X = IGNORE_INDEX


def test_answer_accuracy_scores_next_token_predictions_at_answer_positions_only():
    # Position t predicts token t + 1: predictions[:, t] is compared with labels[:, t + 1] where that is scored.
    labels = np.array([[X, X, 7, X, 9], [X, 5, X, 6, X]])
    predictions = np.array([[0, 7, 1, 8, 3], [5, 2, 6, 6, 4]])  # row 0: 7 right, 8 wrong; row 1: 5 and 6 right
    assert answer_accuracy(predictions, labels) == 3 / 4
    # Logits [B, T, V] give the same through their argmax; torch tensors are accepted as well.
    logits = torch.nn.functional.one_hot(torch.tensor(predictions), 10).float()
    assert answer_accuracy(logits, torch.tensor(labels)) == 3 / 4
    # The last position predicts nothing; an unscored answer in position 0 is never compared.
    assert math.isnan(answer_accuracy(np.array([[7, 0]]), np.array([[7, X]])))


def test_answer_metrics_reports_answer_accuracy():
    labels = np.array([[X, 4, X, 5]])
    predictions = np.array([[4, 0, 1, 2]])  # 4 right, 1 for 5 wrong
    assert answer_metrics(EvalPrediction(predictions=predictions, label_ids=labels)) == {"accuracy": 0.5}


def test_match3_describe_is_the_positive_rate_and_the_best_guess_per_position():
    data = Dataset.from_dict({"answers": [[1, 0, 1], [1, 1, 1], [0, 1, 1], [1, 1, 0]]})
    stats = Match3Task(modulus=8, length=3).describe(data)
    assert stats["positive_rate"] == pytest.approx(9 / 12)
    # per position positive rates 3/4, 3/4, 3/4: the best guess from the position alone is right 3/4 of the time
    assert stats["position_only_accuracy"] == pytest.approx(3 / 4)
    skewed = Dataset.from_dict({"answers": [[0, 1], [0, 1], [0, 0], [1, 1]]})
    # position 0: 1/4 positive (guess "-": 3/4 right); position 1: 3/4 positive (guess "+": 3/4 right)
    assert Match3Task(modulus=8, length=2).describe(skewed) == pytest.approx(
        {"positive_rate": 4 / 8, "position_only_accuracy": 3 / 4})


@pytest.mark.parametrize("default, layer_class", [("four_cache", FourCacheLayer), ("two_cache", TwoCacheLayer)])
def test_default_cache_implementation_and_the_dynamic_alias_pick_the_configs_layout(make_model, default, layer_class):
    model = make_model(default_cache_implementation=default)
    assert isinstance(TensorAttnCache(model.config).layers[0], layer_class)
    ids = torch.randint(3, 259, (1, 5))
    kw = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    for name in (None, "dynamic"):
        out = model.generate(ids, cache_implementation=name, **kw)
        assert isinstance(output_cache(out).layers[0], layer_class), name
    # A name given explicitly wins over the config's default.
    other = "two_cache" if default == "four_cache" else "four_cache"
    out = model.generate(ids, cache_implementation=other, **kw)
    assert output_cache(out).cache_implementation == other


def test_register_layout_registers_names_checks_the_class_and_opens_generation_config():
    with pytest.raises(TypeError, match="TensorAttnCacheLayer subclass"):
        register_layout("not_a_layer")(dict)
    assert "not_a_layer" not in available_cache_implementations()

    try:
        @register_layout("direct_test_layout")
        class DirectTestLayer(FourCacheLayer):
            pass

        assert LAYOUTS["direct_test_layout"] is DirectTestLayer
        assert DirectTestLayer.layout_name == "direct_test_layout"
        assert issubclass(DirectTestLayer, TensorAttnCacheLayer)
        assert "direct_test_layout" in available_cache_implementations()
        GenerationConfig(cache_implementation="direct_test_layout").validate(strict=True)  # no error for the name
    finally:
        LAYOUTS.pop("direct_test_layout", None)
