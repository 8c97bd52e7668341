"""The one-query decode kernels (`ops.decode`) against the naive reference, in float64: four_cache_decode in place
and differentiable, in blocks, with both exp paths, and the two-matrix layout's pair rows."""

import pytest
import torch

from hf_tensor_attn.ops import naive_tensor_attention
from hf_tensor_attn.ops import four_cache_decode
from hf_tensor_attn.ops.decode import pair_rows_attention


def decode_inputs(B=2, H=3, T=11, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g, dtype=torch.float64)
    streams = [torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(4)]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, : T // 2] = 0
    mask[-1, max(T - 3, 0)] = 0
    return q, streams, mask


@pytest.fixture(params=["bound", "always"])
def exp_shift(request, monkeypatch):
    """The in-place decode skips the max shift when a Cauchy-Schwarz bound allows it; 'always' forces the shift."""
    if request.param == "always":
        from hf_tensor_attn.ops import decode

        monkeypatch.setattr(decode, "EXP_HEADROOM", {})
    return request.param


@pytest.mark.parametrize("windows", [(None, None), (3, None), (2, 5), (20, 1)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("T", [1, 11])
def test_four_cache_decode_matches_naive_in_place_and_differentiable(windows, masked, T, exp_shift):
    q, streams, mask = decode_inputs(T=T)
    kw = dict(scale=0.4, w1=windows[0], w2=windows[1], attention_mask=mask if masked else None)
    ref = naive_tensor_attention(q, *streams, **kw)
    with torch.no_grad():
        torch.testing.assert_close(four_cache_decode(q, *streams, **kw), ref, rtol=1e-12, atol=1e-12)
    leaves = [t.clone().requires_grad_(True) for t in (q, *streams)]
    out = four_cache_decode(*leaves, **kw)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, *streams)]
    ref_grads = torch.autograd.grad(naive_tensor_attention(*ref_leaves, **kw), ref_leaves, dout)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("windows", [(None, None), (37, 20)])
def test_four_cache_decode_in_blocks_matches_naive(monkeypatch, windows, exp_shift):
    from hf_tensor_attn.ops import decode

    monkeypatch.setattr(decode, "_SCORES_PER_BLOCK", 1)  # blocks of 16 rows: 3 blocks for 40 tokens
    q, streams, _ = decode_inputs(B=3, T=40)
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[0, :20] = 0  # the whole first block masked, the second half masked
    mask[1, :] = 0  # no allowed pair at all: zeros
    mask[2, 5:9] = 0
    kw = dict(scale=0.4, w1=windows[0], w2=windows[1])
    with torch.no_grad():
        for m in (None, mask):
            torch.testing.assert_close(
                four_cache_decode(q, *streams, attention_mask=m, **kw),
                naive_tensor_attention(q, *streams, attention_mask=m, **kw),
                rtol=1e-12,
                atol=1e-12,
            )


def test_four_cache_decode_large_scores_take_the_shifted_exp():
    # scores in the hundreds: exp without the max shift would overflow float32
    q, streams, mask = decode_inputs(T=20, D=60)
    q32, s32 = (q * 4).float(), [(t * 4).float() for t in streams]
    with torch.no_grad():
        out = four_cache_decode(q32, *s32, scale=1.0, attention_mask=mask)
    ref = naive_tensor_attention(q32.double(), *[t.double() for t in s32], scale=1.0, attention_mask=mask).float()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_four_cache_decode_pad_query_gives_zeros_and_float32_matches():
    q, streams, _ = decode_inputs(B=1, T=5)
    with torch.no_grad():
        out = four_cache_decode(q, *streams, scale=1.0, attention_mask=torch.zeros(1, 5, dtype=torch.long))
    assert torch.equal(out, torch.zeros_like(out))
    q, streams, mask = decode_inputs(T=33, D=60)
    q32, s32 = q.float(), [t.float() for t in streams]
    with torch.no_grad():
        out = four_cache_decode(q32, *s32, scale=0.125, attention_mask=mask)
    torch.testing.assert_close(out, naive_tensor_attention(q32, *s32, scale=0.125, attention_mask=mask), rtol=1e-4, atol=1e-5)


def test_pair_rows_decode_matches_naive():
    q, (k1, k2, v1, v2), mask = decode_inputs(T=9)
    ref = naive_tensor_attention(q, k1, k2, v1, v2, scale=0.3)
    B, H, T, D = k1.shape
    kt = (k1[:, :, :, None] * k2[:, :, None]).reshape(B, H, T * T, D)  # row (a, b) = k1_a * k2_b
    vt = (v1[:, :, :, None] * v2[:, :, None]).reshape(B, H, T * T, D)
    torch.testing.assert_close(pair_rows_attention(q, kt, vt, scale=0.3), ref, rtol=1e-12, atol=1e-12)
    real = mask.bool()
    allowed = (real[:, :, None] & real[:, None, :]).reshape(B, 1, 1, T * T)
    torch.testing.assert_close(
        pair_rows_attention(q, kt, vt, scale=0.3, allowed=allowed),
        naive_tensor_attention(q, k1, k2, v1, v2, scale=0.3, attention_mask=mask),
        rtol=1e-12,
        atol=1e-12,
    )
