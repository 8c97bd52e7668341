"""4D custom attention masks ([B, 1, T, T], the allowed keys of each query), as transformers' models take them: a
row holding a shared prefix and two continuations gives each continuation the logits it has alone; the door's
per-query masks equal the 2D-mask op in outputs and gradients; what cannot take such a mask says so."""

import pytest
import torch

from hf_tensor_attn.ops import tensor_attention

HYBRID = ["tensor_attention", "full_attention"]


def shared_prefix_row(prefix, first, second):
    """(row [1, T], allowed [T, T] bool, position_ids [1, T]): prefix, then `first` and `second`, each continuation
    seeing the prefix and itself (causally), positions continuing the prefix in both."""
    row = torch.cat([prefix, first, second])[None]
    P, A, T = len(prefix), len(first), row.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = torch.zeros(T, T, dtype=torch.bool)
    allowed[: P + A, : P + A] = causal[: P + A, : P + A]
    allowed[P + A :, :P] = True
    allowed[P + A :, P + A :] = causal[P + A :, P + A :]
    positions = torch.cat([torch.arange(P + A), torch.arange(P, T - A)])[None]
    return row, allowed, positions


@pytest.mark.parametrize("kind", ["bool", "int", "additive"])
def test_shared_prefix_row_gives_each_continuation_its_own_logits(make_model, kind):
    model = make_model(layer_types=HYBRID, num_key_value_heads=1)
    prefix, first, second = (torch.randint(3, 259, (n,)) for n in (4, 2, 3))
    row, allowed, positions = shared_prefix_row(prefix, first, second)
    mask = {"bool": allowed, "int": allowed.long(),
            "additive": torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(
                torch.float64).min)}[kind][None, None]
    packed = model(row, attention_mask=mask, position_ids=positions).logits[0]
    alone_first = model(torch.cat([prefix, first])[None], use_cache=False).logits[0]
    alone_second = model(torch.cat([prefix, second])[None], use_cache=False).logits[0]
    torch.testing.assert_close(packed[:6], alone_first, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(packed[6:], alone_second[4:], rtol=1e-10, atol=1e-10)
    # The mask matters: without it the second continuation would see the first.
    assert not torch.allclose(model(row, position_ids=positions, use_cache=False).logits[0, 6:], alone_second[4:])


@pytest.mark.parametrize("windows", [(None, None), (3, 5)])
def test_per_query_masks_equal_the_padding_mask_op_in_outputs_and_gradients(windows):
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 2, 7, 5
    inputs = [torch.randn(B, H, T, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(5)]
    padding = torch.ones(B, T, dtype=torch.bool)
    padding[1, :2] = False
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    per_query = causal[None] & padding[:, None, :]  # what causality and padding allow, spelt out per query
    w1, w2 = windows
    out = tensor_attention(*inputs, scale=0.4, w1=w1, w2=w2, query_masks=per_query)
    ref = tensor_attention(*inputs, scale=0.4, w1=w1, w2=w2, attention_mask=padding)
    real = padding[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out[real].sum(), inputs)
    ref_grads = torch.autograd.grad(ref[real].sum(), inputs)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_what_cannot_take_a_4d_mask_says_so(make_model):
    model = make_model(layer_types=HYBRID)
    ids = torch.randint(3, 259, (1, 5))
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    with pytest.raises(ValueError, match="4D `attention_mask`.*without a cache"):
        model(ids, attention_mask=allowed, use_cache=True)
    with pytest.raises(ValueError, match=r"\[batch or 1, 1, tokens, tokens\] = \[1, 1, 5, 5\], got shape \(1, 2, 5, 5\)"):
        model(ids, attention_mask=allowed.expand(1, 2, 5, 5))
    poly = make_model(layer_types=["poly_tensor_attention", "tensor_attention"])
    with pytest.raises(ValueError, match="not supported by 'poly_tensor_attention' layers"):
        poly(ids, attention_mask=allowed)
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="4D attention_mask: the weights of such a row are not computed"):
        model(ids, attention_mask=allowed, output_attentions=True)
