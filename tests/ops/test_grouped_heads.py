"""Grouped key/value heads (H_kv < H): every op, cache layout and a whole layer equal the computation with the
key/value heads repeated for their query heads, and the caches hold H_kv heads only."""

from __future__ import annotations

import pytest
import torch

from hf_tensor_attn import TensorAttnCache
from hf_tensor_attn.modeling import TensorAttention, TensorAttnRotaryEmbedding, rotary_tables
from hf_tensor_attn.ops import four_cache_decode, naive_tensor_attention, tensor_attention
from hf_tensor_attn.ops.common import repeat_kv
from hf_tensor_attn.ops.exact.decode import pair_rows_attention
from hf_tensor_attn.configuration import TensorAttnConfig

B, H, H_KV, D = 2, 6, 2, 10
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def grouped_inputs(Tq, Tk, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64).to(dtype)
    kv = [torch.randn(B, H_KV, Tk, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]
    return q, kv


def repeated_heads_reference(q, kv, **kw):
    """The definition with the key/value heads repeated explicitly: a plain float64 einsum, independent of the ops."""
    k1, k2, v1, v2 = (t[:, :, None].expand(-1, -1, H // H_KV, -1, -1).reshape(B, H, *t.shape[2:]).double() for t in kv)
    Tq, Tk = q.shape[2], k1.shape[2]
    scores = torch.einsum("bhtd,bhad,bhcd->bhtac", q.double(), k1, k2) * kw["scale"]
    t = torch.arange(Tk - Tq, Tk)[:, None]
    ok = torch.arange(Tk)[None] <= t
    if kw.get("w1") is not None:
        ok1 = ok & (t - torch.arange(Tk)[None] < kw["w1"])
    else:
        ok1 = ok
    ok2 = ok & (t - torch.arange(Tk)[None] < kw["w2"]) if kw.get("w2") is not None else ok
    allowed = ok1[:, :, None] & ok2[:, None, :]
    if kw.get("attention_mask") is not None:
        real = kw["attention_mask"].bool()
        allowed = allowed[None] & real[:, None, :, None] & real[:, None, None, :]
        allowed = allowed[:, None]
    scores = scores.masked_fill(~allowed, float("-inf")).reshape(B, H, Tq, Tk * Tk)
    probs = torch.nan_to_num(torch.softmax(scores, -1)).reshape(B, H, Tq, Tk, Tk)
    return torch.einsum("bhtac,bhad,bhcd->bhtd", probs, v1, v2).to(q.dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("windows", [(None, None), (3, 5)])
@pytest.mark.parametrize("padded", [False, True])
def test_ops_equal_the_repeated_heads_computation(dtype, windows, padded):
    Tk = 9
    mask = None
    if padded:
        mask = torch.ones(B, Tk, dtype=torch.long)
        mask[0, :3] = 0
    kw = dict(scale=0.4, w1=windows[0], w2=windows[1], attention_mask=mask)
    q, kv = grouped_inputs(Tk, Tk, dtype)
    expected = repeated_heads_reference(q, kv, **kw)
    for op in (naive_tensor_attention, tensor_attention):
        torch.testing.assert_close(op(q, *kv, **kw), expected, rtol=TOL[dtype], atol=TOL[dtype], msg=op.__name__)
    decode_q = q[:, :, -1:]
    expected_last = repeated_heads_reference(decode_q, kv, **kw)
    torch.testing.assert_close(four_cache_decode(decode_q, *kv, **kw), expected_last, rtol=TOL[dtype], atol=TOL[dtype])


def test_tiled_gradients_equal_the_repeated_heads_gradients():
    """Gradients flow to the H_kv heads, summed over their groups: compare with the op on explicitly repeated heads."""
    q, kv = grouped_inputs(7, 7, torch.float64)
    dout = torch.randn(B, H, 7, D, dtype=torch.float64)
    kw = dict(scale=0.3, w1=4, w2=None)

    def grads(fn, repeat):
        leaves = [t.clone().requires_grad_(True) for t in (q, *kv)]
        streams = [repeat_kv(t, H // H_KV) if repeat else t for t in leaves[1:]]
        return torch.autograd.grad(fn(leaves[0], *streams, **kw), leaves, dout)

    for actual, expected in zip(grads(tensor_attention, False), grads(naive_tensor_attention, True)):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_decode_gradients_equal_the_repeated_heads_gradients():
    q, kv = grouped_inputs(1, 8, torch.float64)
    dout = torch.randn(B, H, 1, D, dtype=torch.float64)

    def grads(repeat):
        leaves = [t.clone().requires_grad_(True) for t in (q, *kv)]
        streams = [repeat_kv(t, H // H_KV) if repeat else t for t in leaves[1:]]
        return torch.autograd.grad(four_cache_decode(leaves[0], *streams, scale=0.5), leaves, dout)

    for actual, expected in zip(grads(False), grads(True)):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_pair_rows_attention_folds_groups_without_repeating_rows():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, 3, D, generator=g, dtype=torch.float64)
    rows_k, rows_v = (torch.randn(B, H_KV, 11, D, generator=g, dtype=torch.float64) for _ in range(2))
    allowed = torch.rand(B, 1, 3, 11, generator=g) > 0.3
    expected = pair_rows_attention(q, repeat_kv(rows_k, H // H_KV), repeat_kv(rows_v, H // H_KV), scale=0.7,
                                   allowed=allowed)
    torch.testing.assert_close(pair_rows_attention(q, rows_k, rows_v, scale=0.7, allowed=allowed), expected)


def test_ops_refuse_key_heads_that_do_not_divide_the_query_heads():
    q = torch.randn(1, 6, 4, 8)
    kv = [torch.randn(1, 4, 4, 8) for _ in range(4)]
    with pytest.raises(ValueError, match="k1.*4 heads.*divide the 6"):
        tensor_attention(q, *kv, scale=1.0)


def grouped_config(**kw):
    kw = {"num_key_value_heads": H_KV, **kw}
    return TensorAttnConfig(hidden_size=48, num_attention_heads=H, head_dim=D, num_hidden_layers=1, **kw)


@pytest.mark.parametrize("layout, cache_config", [
    ("four_cache", {}), ("two_cache", {}),
    ("subgen4", {"recent_window": 4, "sink_tokens": 1, "delta": 0.8}),
    ("subgen2", {"recent_window": 4, "sink_tokens": 1, "delta": 0.8}),
])
def test_each_layout_with_grouped_heads_equals_the_repeated_heads_cache(layout, cache_config):
    """A prompt then decode steps, with eviction into SubGen summaries: a cache fed H_kv heads answers exactly as
    one fed the heads repeated, and holds fewer bytes. (The "sampled" numerator draws its samples per held head, so a
    repeated-heads cache draws different ones: it cannot be compared exactly.)"""
    grouped = TensorAttnCache(grouped_config(), layout, cache_config)
    repeated = TensorAttnCache(grouped_config(num_key_value_heads=H), layout, cache_config)
    g = torch.Generator().manual_seed(2)
    steps = [6, 1, 1, 1, 1, 1, 1]
    for T in steps:
        q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
        k, v = (torch.randn(B, H_KV, T, 2 * D, generator=g, dtype=torch.float64) for _ in range(2))
        out = grouped.attend(0, q, k, v)
        expected = repeated.attend(0, q, repeat_kv(k, H // H_KV), repeat_kv(v, H // H_KV))
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert grouped.layers[0].keys.shape[1] == H_KV
    if layout.startswith("subgen"):
        assert grouped.layers[0].n_evicted > 0  # the summaries were used, not only exact tokens
    assert grouped.memory_bytes() < repeated.memory_bytes()


def test_four_cache_memory_shrinks_by_the_group_size():
    sizes = {}
    for heads in (H, H_KV):
        cache = TensorAttnCache(grouped_config(num_key_value_heads=heads), "four_cache")
        cache.attend(0, torch.randn(B, H, 16, D), torch.randn(B, heads, 16, 2 * D), torch.randn(B, heads, 16, 2 * D))
        sizes[heads] = cache.memory_bytes()
    assert sizes[H] == sizes[H_KV] * (H // H_KV)


def test_grouped_tensor_layer_equals_the_layer_with_repeated_projections():
    """A whole GQA tensor layer (projections, RoPE on the chosen streams, the op) against the same layer with H key/value
    heads whose k/v projection rows are the grouped ones repeated per query head."""
    torch.manual_seed(0)
    config = grouped_config(tensor_rope_streams=["q", "k2"], tensor_kv2_bias=True, attention_bias=True)
    wide = grouped_config(tensor_rope_streams=["q", "k2"], tensor_kv2_bias=True, attention_bias=True,
                          num_key_value_heads=H)
    layer, wide_layer = TensorAttention(config, 0).double(), TensorAttention(wide, 0).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    state = layer.state_dict()
    for name in ("k_proj", "v_proj"):
        for suffix in ("weight", "bias"):
            t = state[f"{name}.{suffix}"]
            per_head = t.reshape(H_KV, 1, 2 * D, *t.shape[1:]).expand(H_KV, H // H_KV, 2 * D, *t.shape[1:])
            state[f"{name}.{suffix}"] = per_head.reshape(H * 2 * D, *t.shape[1:])
    for name in ("k2_bias", "v2_bias"):
        state[name] = state[name].repeat_interleave(H // H_KV, dim=0)
    wide_layer.load_state_dict(state)
    x = torch.randn(B, 7, 48, dtype=torch.float64)
    cos_sin = rotary_tables(*TensorAttnRotaryEmbedding(config)(x, torch.arange(7)[None].expand(B, -1)))
    torch.testing.assert_close(layer(x, cos_sin)[0], wide_layer(x, cos_sin)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("windows", [(None, None), (20, 7)])
def test_in_place_decode_with_grouped_heads_in_blocks(monkeypatch, blocks, shifted, windows):
    """The no-grad decode folds each group's query heads into the rows of one GEMM per key/value head: in one block
    or many, with the max shift or without, windows and padding, it equals the repeated-heads computation."""
    from hf_tensor_attn.ops.exact import decode

    if blocks == "many":
        monkeypatch.setattr(decode, "_SCORES_PER_BLOCK", 1)  # blocks of 16 rows: 3 blocks for 40 tokens
    if shifted:
        monkeypatch.setattr(decode, "EXP_HEADROOM", {})
    q, kv = grouped_inputs(1, 40, torch.float64, seed=3)
    mask = torch.ones(B, 40, dtype=torch.long)
    mask[1, :5] = 0
    kw = dict(scale=0.4, w1=windows[0], w2=windows[1], attention_mask=mask)
    torch.testing.assert_close(four_cache_decode(q, *kv, **kw), repeated_heads_reference(q, kv, **kw),
                               rtol=1e-10, atol=1e-10)
