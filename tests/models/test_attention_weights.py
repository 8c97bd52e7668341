"""Attention weights of tensor layers (`output_attentions=True` under `attn_implementation="eager"`): per query, the
pair weights marginalised over the second key, P_t(a) = sum_b P_t(a, b); the output is computed through them."""

import pytest
import torch

from hf_tensor_attn.ops.exact.naive import naive_pair_weights, naive_tensor_attention, naive_tensor_attention_with_weights

HYBRID = ["tensor_attention", "full_attention"]


@pytest.mark.parametrize("windows", [(None, None), (3, 2)])
def test_reference_with_weights_equals_the_reference_and_reports_the_marginal(windows):
    w1, w2 = windows
    B, H, H_kv, T, D = 2, 4, 2, 7, 5
    q = torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True)
    k1, k2, v1, v2 = (torch.randn(B, H_kv, T, D, dtype=torch.float64, requires_grad=True) for _ in range(4))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0  # row 0: three pad positions, its first three queries have no allowed pair
    kw = dict(scale=0.4, w1=w1, w2=w2, attention_mask=mask)
    expected = naive_tensor_attention(q, k1, k2, v1, v2, **kw)
    out, weights = naive_tensor_attention_with_weights(q, k1, k2, v1, v2, **kw)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    inputs = (q, k1, k2, v1, v2)
    for got, want in zip(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(expected.sum(), inputs)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    pairs = naive_pair_weights(q, k1, k2, **kw)  # [B, H, T, T, T]
    torch.testing.assert_close(weights, pairs.sum(-1))
    sums = weights.sum(-1)  # [B, H, T]
    torch.testing.assert_close(sums[0, :, 3:], torch.ones(H, T - 3, dtype=torch.float64))
    assert (sums[0, :, :3] == 0).all()  # no allowed pair: zeros, not NaN
    assert (weights.triu(1) == 0).all()  # causal
    assert (weights[0, :, :, :3] == 0).all()  # pad keys get nothing


def test_eager_model_returns_tensor_layer_weights_inside_the_graph(make_model, left_padded):
    model = make_model(layer_types=HYBRID, num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    ids, mask = left_padded([6, 3])[1:]
    plain = model(ids, attention_mask=mask)
    out = model(ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-12, atol=1e-12)
    tensor_weights, standard_weights = out.attentions
    assert tensor_weights.shape == standard_weights.shape == (2, 4, 6, 6)
    tensor_weights.retain_grad()
    out.logits[0, -1].sum().backward()
    assert tensor_weights.grad is not None and tensor_weights.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["four_cache", "two_cache"])
def test_cached_steps_report_the_weights_of_one_full_forward(make_model, left_padded, layout):
    from hf_tensor_attn import TensorAttnCache

    model = make_model(layer_types=HYBRID, attn_implementation="eager")
    ids, mask = left_padded([6, 4])[1:]
    full = model(ids, attention_mask=mask, output_attentions=True).attentions
    cache = TensorAttnCache(model.config, layout)
    model(ids[:, :4], attention_mask=mask[:, :4], cache=cache, output_attentions=True)
    for t in (4, 5):
        step = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, output_attentions=True)
        for got, want in zip(step.attentions, full):
            torch.testing.assert_close(got, want[:, :, t : t + 1, : t + 1], rtol=1e-10, atol=1e-12)


def test_no_weights_where_they_do_not_exist(make_model):
    """A layout that keeps a summary of the past has no per-token weights; SDPA returns none for any layer."""
    from hf_tensor_attn import TensorAttnCache

    model = make_model(layer_types=HYBRID, attn_implementation="eager")
    ids = torch.randint(3, 259, (1, 40))
    cache = TensorAttnCache(model.config, "subgen4", {"recent_window": 4})
    plain = model(ids, cache=TensorAttnCache(model.config, "subgen4", {"recent_window": 4}))
    out = model(ids, cache=cache, output_attentions=True)
    assert out.attentions[0] is None and out.attentions[1] is not None
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)
    sdpa = make_model(layer_types=HYBRID, attn_implementation="sdpa")
    assert sdpa(ids, output_attentions=True).attentions == (None, None)
