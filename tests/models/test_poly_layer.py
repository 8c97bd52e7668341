"""The trainable `"poly_tensor_attention"` layer type: config checks, cached decoding exact against the full
forward, generate (greedy, sampling, beam search, left padding) equal to no cache, hybrid stacks, training and
save / load through the Auto classes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_tensor_attn import TensorAttnCache
from hf_tensor_attn.cache import PolyCacheLayer
from hf_tensor_attn.compat import output_cache

STACK = ["poly_tensor_attention", "full_attention", "tensor_attention"]


def poly_model(make_model, **overrides):
    kw = dict(layer_types=STACK, num_hidden_layers=3, initializer_range=0.2, poly_feature_dim=4)
    kw.update(overrides)
    return make_model(**kw)


def test_cached_prefill_and_decode_equal_full_forward(make_model, left_padded):
    model = poly_model(make_model)
    _, ids, mask = left_padded([9, 5, 2])
    full = model(ids, attention_mask=mask, use_cache=False).logits
    for layout in ("four_cache", "two_cache"):  # poly layers keep their own state whatever the tensor layout
        cache = TensorAttnCache(model.config, layout)
        steps = [model(ids[:, :4], attention_mask=mask[:, :4], cache=cache).logits]
        for t in range(4, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
        assert isinstance(cache.layers[0], PolyCacheLayer)
        real = mask.bool()
        torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["greedy", "beam", "sample"])
def test_generate_equals_no_cache(make_model, left_padded, mode):
    model = poly_model(make_model)
    _, ids, mask = left_padded([7, 4, 2])
    kw = {"greedy": dict(do_sample=False), "beam": dict(do_sample=False, num_beams=3),
          "sample": dict(do_sample=True, top_k=20)}[mode]
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=8, use_cache=use_cache, **kw))
    assert torch.equal(*runs)


def test_left_padded_rows_equal_rows_alone(make_model, left_padded):
    model = poly_model(make_model)
    rows, ids, mask = left_padded([7, 4, 2])
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)[:, ids.shape[1] :]
    for i, row in enumerate(rows):
        assert torch.equal(batch[i : i + 1], model.generate(row[None], max_new_tokens=6, do_sample=False)[:, len(row) :])


def test_state_is_constant_in_length_and_sized_by_the_feature_dim(make_model):
    model = poly_model(make_model, layer_types=["poly_tensor_attention"], num_hidden_layers=1, poly_feature_dim=4)
    H, D = model.config.num_attention_heads, model.config.head_dim
    sizes = []
    for n in (16, 128):
        out = model.generate(torch.randint(3, 259, (1, n)), max_new_tokens=1, return_dict_in_generate=True)
        sizes.append(output_cache(out).memory_bytes())
    r = 15  # C(4 + 2, 2) features
    assert sizes[0] == sizes[1] == 8 * H * (2 * r * D + 2 * r + 2 * 4) + 8  # float64 S1, S2, Z1, Z2, M1, M2, N


def test_trains(make_model):
    model = poly_model(make_model, layer_types=["poly_tensor_attention"] * 2, num_hidden_layers=2).float().train()
    ids = torch.randint(3, 259, (2, 12))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_save_load_generate_through_auto_classes(make_model, tmp_path, left_padded):
    model = poly_model(make_model, dtype=torch.float32)  # float32: the dtype a saved model reloads in unasked
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.layer_types == STACK and loaded.config.poly_feature_dim == 4
    _, ids, mask = left_padded([6, 3])
    torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                               rtol=0, atol=0)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(loaded.generate(ids, **kw), model.generate(ids, **kw))
    assert torch.equal(loaded.generate(ids, num_beams=2, **kw), model.generate(ids, num_beams=2, **kw))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("poly_degree", 3, r"`poly_degree` must be an even int >= 2.*got 3"),
        ("poly_degree", 0, r"`poly_degree` must be an even int >= 2.*got 0"),
        ("poly_degree", 2.0, r"`poly_degree`.*got 2.0"),
        ("poly_feature_dim", 0, r"`poly_feature_dim` must be a positive int, got 0"),
    ],
)
def test_bad_poly_fields_raise_naming_them(field, value, match):
    with pytest.raises(ValueError, match=match):
        AutoConfig.for_model("tensor_attn", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             layer_types=["poly_tensor_attention"], **{field: value})


def test_unknown_layer_type_lists_poly():
    with pytest.raises(ValueError, match="poly_tensor_attention"):
        AutoConfig.for_model("tensor_attn", num_hidden_layers=1, layer_types=["linear_attention"])
