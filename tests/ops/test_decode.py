"""The one-query decode kernels (`ops.exact.decode`) against the naive reference, in float64: four_cache_decode in
place (the compiled loop and the torch ops, `decode_loops`) and differentiable, in blocks and tiles, with both exp
paths, and the two-matrix layout's pair rows."""

import pytest
import torch

from hf_tensor_attn.ops import naive_tensor_attention
from hf_tensor_attn.ops import four_cache_decode
from hf_tensor_attn.ops.exact.decode import pair_rows_attention


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
        from hf_tensor_attn.ops.exact import decode

        monkeypatch.setattr(decode, "EXP_HEADROOM", {})
    return request.param


@pytest.mark.parametrize("windows", [(None, None), (3, None), (2, 5), (20, 1)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("T", [1, 11])
def test_four_cache_decode_matches_naive_in_place_and_differentiable(windows, masked, T, exp_shift, decode_loops):
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
    from hf_tensor_attn.ops import extension
    from hf_tensor_attn.ops.exact import decode

    monkeypatch.setenv(extension.ENV, "0")  # the torch ops' blocks (the compiled loop's tiles: the test below)
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


def test_four_cache_decode_large_scores_take_the_shifted_exp(decode_loops):
    # scores in the hundreds: exp without the max shift would overflow float32
    q, streams, mask = decode_inputs(T=20, D=60)
    q32, s32 = (q * 4).float(), [(t * 4).float() for t in streams]
    with torch.no_grad():
        out = four_cache_decode(q32, *s32, scale=1.0, attention_mask=mask)
    ref = naive_tensor_attention(q32.double(), *[t.double() for t in s32], scale=1.0, attention_mask=mask).float()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_four_cache_decode_pad_query_gives_zeros_and_float32_matches(decode_loops):
    q, streams, _ = decode_inputs(B=1, T=5)
    with torch.no_grad():
        out = four_cache_decode(q, *streams, scale=1.0, attention_mask=torch.zeros(1, 5, dtype=torch.long))
    assert torch.equal(out, torch.zeros_like(out))
    q, streams, mask = decode_inputs(T=33, D=60)
    q32, s32 = q.float(), [t.float() for t in streams]
    with torch.no_grad():
        out = four_cache_decode(q32, *s32, scale=0.125, attention_mask=mask)
    torch.testing.assert_close(out, naive_tensor_attention(q32, *s32, scale=0.125, attention_mask=mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T", [7, 37, 130])
def test_compiled_decode_small_and_large_tiles_match_naive(T, decode_loops):
    """Three query heads per key/value head and a head width of 20 (one run of 16 values and 4 more): at T = 7 and 37
    the tiles (3 T rows by T columns) run the compiled step's register-blocked loops, whose blocks of four rows end in
    a partial one and whose runs of 16 columns in a partial one; at T = 130 they run ATen GEMMs. Padding in one row."""
    g = torch.Generator().manual_seed(T)
    B, H_kv, groups, D = 2, 2, 3, 20
    q = torch.randn(B, H_kv * groups, 1, D, generator=g, dtype=torch.float64)
    k1, k2, v1, v2 = (torch.randn(B, H_kv, T, D, generator=g, dtype=torch.float64) for _ in range(4))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, : T // 3] = 0
    with torch.no_grad():
        out = four_cache_decode(q, k1, k2, v1, v2, scale=0.3, attention_mask=mask)
    ref = naive_tensor_attention(q, k1, k2, v1, v2, scale=0.3, attention_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("windows", [(None, None), (300, 600), (650, 90)])
def test_compiled_decode_tiles_match_naive(groups, windows, decode_loops):
    """Contexts past one tile of the compiled step (512 columns, 128 / groups rows, at least 64): its tiles are
    combined by their shifts, with padding that fills whole tiles, a sequence with nothing allowed, and streams that
    are strided views of wider buffers (k1 | k2 side by side, as a cache holds them)."""
    g = torch.Generator().manual_seed(groups)
    B, H_kv, T, D = 3, 2, 700, 3
    q = torch.randn(B, H_kv * groups, 1, D, generator=g, dtype=torch.float64) * 3
    k, v = (torch.randn(B, H_kv, T, 2 * D, generator=g, dtype=torch.float64) for _ in range(2))
    streams = [*k.chunk(2, dim=-1), *v.chunk(2, dim=-1)]
    k1, k2, v1, v2 = streams[0], streams[1], streams[2], streams[3]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :530] = 0  # the first column tile and four row tiles: nothing allowed there
    mask[1, :] = 0  # no allowed pair: zeros
    mask[2, 100:105] = 0
    kw = dict(scale=0.5, w1=windows[0], w2=windows[1])
    with torch.no_grad():
        for m in (None, mask):
            out = four_cache_decode(q, k1, k2, v1, v2, attention_mask=m, **kw)
            ref = naive_tensor_attention(q, k1, k2, v1, v2, attention_mask=m, **kw)
            torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)


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


# ---- the static cache's step: queries at positions of a buffer longer than what is written ----


@pytest.mark.parametrize("windows", [(None, None), (3, None), (None, 4), (2, 5)])
@pytest.mark.parametrize("written,Tq", [(1, 1), (7, 1), (13, 1), (6, 3), (13, 13)])
@pytest.mark.parametrize("groups", [1, 2])
def test_positioned_attention_matches_naive_on_the_written_tokens(windows, written, Tq, groups):
    from hf_tensor_attn.ops.exact.decode import positioned_tensor_attention

    g = torch.Generator().manual_seed(written * 10 + Tq)
    B, H_kv, L, D = 2, 2, 13, 5
    q = torch.randn(B, H_kv * groups, Tq, D, generator=g, dtype=torch.float64)
    streams = [torch.randn(B, H_kv, L, D, generator=g, dtype=torch.float64) for _ in range(4)]
    streams = [torch.cat([t[:, :, :written], 1e6 * t[:, :, written:]], 2) for t in streams]  # unwritten: junk
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, :3] = False  # left padding; row 1 has no real token for the first queries
    w1, w2 = windows
    out = positioned_tensor_attention(q, *streams, scale=0.4, positions=torch.arange(written - Tq, written), w1=w1,
                                      w2=w2, attention_mask=mask)
    ref = naive_tensor_attention(q, *(t[:, :, :written] for t in streams), scale=0.4, w1=w1, w2=w2,
                                 attention_mask=mask[:, :written])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_positioned_attention_nan_reaches_only_the_queries_that_use_it():
    from hf_tensor_attn.ops.exact.decode import positioned_tensor_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 4, 3, generator=g, dtype=torch.float64)
    streams = [torch.randn(1, 1, 9, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    streams[2][0, 0, 5, 1] = float("nan")  # v1 of token 5: queries at 5 and 6 use it, 3 and 4 do not
    out = positioned_tensor_attention(q, *streams, scale=0.5, positions=torch.arange(3, 7))
    ref = naive_tensor_attention(q, *(t[:, :, :7] for t in streams), scale=0.5)
    assert out[0, 0, :2].isfinite().all() and out[0, 0, 2:, 1].isnan().all()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, equal_nan=True)
