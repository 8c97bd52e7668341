"""Tensor-attention ops against their references: the tiled op against `naive_tensor_attention` (outputs and all
five gradients), and the naive op itself against a literal float64 loop over the definition."""

from __future__ import annotations

import math

import pytest
import torch

from hf_tensor_attn.ops import extension, naive_tensor_attention, tensor_attention
from hf_tensor_attn.ops.exact import tiled
from hf_tensor_attn.ops.exact.tiles import TileSizes, plan

# Tolerances are relative to the largest entry of the reference tensor (at least 1), per dtype. float32, bfloat16 and
# float16 all compute in float32 inside; a half-precision result is compared with the naive op on the same inputs
# (which also computes in float32), so what is left is the final rounding to the dtype: at most one ulp of the
# largest entry, 2^-7 relative for bfloat16 and 2^-10 for float16 (measured: below 1e-4 for both).
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2**-7, torch.float16: 2**-10}

# The default tiles cover a T=130 query in one column block; the small and odd ones exercise the online softmax
# across many column blocks, ragged edge blocks and masks on both sides of a tile.
SMALL_TILINGS = {"small": TileSizes(query=4, row=8, col=16), "odd": TileSizes(query=3, row=5, col=7)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["default", *SMALL_TILINGS])
def tiling(request, monkeypatch):
    if request.param in SMALL_TILINGS:
        monkeypatch.setattr(tiled, "choose_tile_sizes", lambda *args, **kw: SMALL_TILINGS[request.param])
    return request.param


@pytest.fixture(params=["compiled", "python"])
def tile_loop(request, monkeypatch):
    """The forward's two tile loops: compiled (`csrc/tiles.cpp`, the default where it builds) and Python."""
    monkeypatch.setenv(extension.ENV, "1" if request.param == "compiled" else "0")
    if request.param == "compiled" and extension.cpu_ops() is None:
        pytest.skip("the compiled CPU tile loops could not be built here (see its RuntimeWarning)")
    return request.param


def make_inputs(B, H, Tq, Tk, D, dtype, *, seed=0, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64) * magnitude
    kv = [torch.randn(B, H, Tk, D, generator=g, dtype=torch.float64) * magnitude for _ in range(4)]
    dout = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, *kv)], dout.to(dtype)


def outputs_and_grads(fn, inputs, dout, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, dout)
    return [out.detach(), *grads]


def assert_close_scaled(actual, expected, tol, name):
    # Inputs are O(1), so an entry that cancels to ~0 (dq of a single-pair query) is judged on the O(1) scale.
    atol = tol * max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=atol, msg=lambda m: f"{name}: {m}")


def padding_mask(B, Tk, *, left=0, interior=()):
    mask = torch.ones(B, Tk, dtype=torch.long)
    mask[0, :left] = 0
    for pos in interior:
        mask[-1, pos] = 0
    return mask


NAMES = ("out", "dq", "dk1", "dk2", "dv1", "dv2")

# (B, H, Tq, Tk, D, w1, w2, mask spec): T in {1, 7, 63, 130}, D in {16, 60}, causal, windows (w1 != w2, w = 1),
# left and interior padding, Tq < Tk (down to one query).
CASES = {
    "T1": (1, 2, 1, 1, 16, None, None, None),
    "T7": (1, 2, 7, 7, 60, None, None, None),
    "T63": (2, 1, 63, 63, 16, None, None, None),
    "T130": (1, 2, 130, 130, 60, None, None, None),
    "window_w1_lt_w2": (1, 2, 130, 130, 16, 5, 40, None),
    "window_w2_lt_w1": (1, 2, 63, 63, 60, 40, 3, None),
    "window_w1_is_1": (1, 1, 63, 63, 16, 1, 9, None),
    "window_w2_only": (1, 2, 63, 63, 16, None, 1, None),
    "window_both_wide": (1, 2, 63, 63, 16, 45, 50, None),
    "window_not_shorter_than_T": (1, 1, 63, 63, 16, 63, 200, None),
    "padded": (2, 2, 63, 63, 60, None, None, {"left": 10, "interior": (30,)}),
    "padded_window": (2, 1, 130, 130, 16, 7, 20, {"left": 3, "interior": (50, 51)}),
    "Tq_lt_Tk": (1, 2, 40, 130, 16, None, 9, None),
    "Tq_1": (2, 1, 1, 63, 60, None, None, {"left": 5, "interior": (20,)}),
    "Tq_lt_Tk_padded_window": (2, 2, 20, 63, 16, 6, 11, {"left": 4, "interior": (50,)}),
}


def run_case(case, dtype, *, magnitude=1.0):
    B, H, Tq, Tk, D, w1, w2, mask_spec = case
    inputs, dout = make_inputs(B, H, Tq, Tk, D, dtype, magnitude=magnitude)
    mask = padding_mask(B, Tk, **mask_spec) if mask_spec else None
    kw = dict(scale=1 / math.sqrt(D), w1=w1, w2=w2, attention_mask=mask)
    return inputs, dout, kw


def check_float64_matches_naive(case):
    inputs, dout, kw = run_case(CASES[case], torch.float64)
    fast = outputs_and_grads(tensor_attention, inputs, dout, **kw)
    ref = outputs_and_grads(naive_tensor_attention, inputs, dout, **kw)
    for name, a, e in zip(NAMES, fast, ref):
        assert a.dtype == torch.float64
        assert_close_scaled(a, e, TOL[torch.float64], name)


@pytest.mark.usefixtures("tile_loop")
@pytest.mark.parametrize("case", list(CASES))
def test_float64_matches_naive(case):
    check_float64_matches_naive(case)


@pytest.mark.usefixtures("tile_loop")
@pytest.mark.parametrize(
    "case", ["T7", "T63", "window_w2_lt_w1", "window_w1_is_1", "padded", "Tq_lt_Tk", "Tq_1", "Tq_lt_Tk_padded_window"]
)
@pytest.mark.parametrize("sizes", list(SMALL_TILINGS))
def test_float64_matches_naive_small_tiles(case, sizes, monkeypatch):
    monkeypatch.setattr(tiled, "choose_tile_sizes", lambda *args, **kw: SMALL_TILINGS[sizes])
    check_float64_matches_naive(case)


@pytest.mark.usefixtures("tile_loop")
@pytest.mark.parametrize("case", ["T7", "T130", "window_w2_lt_w1", "padded_window", "Tq_lt_Tk"])
def test_float32_matches_float64_reference(case):
    inputs, dout, kw = run_case(CASES[case], torch.float32)
    fast = outputs_and_grads(tensor_attention, inputs, dout, **kw)
    ref = outputs_and_grads(naive_tensor_attention, [t.double() for t in inputs], dout.double(), **kw)
    for name, a, e in zip(NAMES, fast, ref):
        assert a.dtype == torch.float32
        assert_close_scaled(a.double(), e, TOL[torch.float32], name)


@pytest.mark.usefixtures("tile_loop")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["T63", "padded_window"])
def test_half_precision_matches_naive(case, dtype):
    inputs, dout, kw = run_case(CASES[case], dtype)
    fast = outputs_and_grads(tensor_attention, inputs, dout, **kw)
    ref = outputs_and_grads(naive_tensor_attention, inputs, dout, **kw)
    for name, a, e in zip(NAMES, fast, ref):
        assert a.dtype == dtype
        assert_close_scaled(a.float(), e.float(), TOL[dtype], name)


@pytest.mark.usefixtures("tile_loop")
@pytest.mark.parametrize("case", ["T130", "padded_window", "Tq_lt_Tk"])
def test_float32_wide_scores_match_float64_reference(case, tiling):
    """Inputs x3 spread the scores over ~200: the kernel's reference score must move (rescaling what it has
    accumulated) and low scores get clamped before exp; the result stays as accurate as the naive op's."""
    inputs, dout, kw = run_case(CASES[case], torch.float32, magnitude=3.0)
    fast = outputs_and_grads(tensor_attention, inputs, dout, **kw)
    ref = outputs_and_grads(naive_tensor_attention, [t.double() for t in inputs], dout.double(), **kw)
    for name, a, e in zip(NAMES, fast, ref):
        assert_close_scaled(a.double(), e, TOL[torch.float32], name)


@pytest.mark.usefixtures("tile_loop")
def test_non_contiguous_inputs():
    """The model passes k1, k2 as halves of one projection (strided views), q transposed from [B, T, H, D]."""
    B, H, T, D = 2, 2, 30, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(B, H, T, 2 * D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, T, 2 * D, generator=g, dtype=torch.float64)
    (k1, k2), (v1, v2) = k.chunk(2, dim=-1), v.chunk(2, dim=-1)
    dout = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    kw = dict(scale=0.25, w1=None, w2=7, attention_mask=torch.ones(B, T, dtype=torch.long))
    fast = outputs_and_grads(tensor_attention, [q, k1, k2, v1, v2], dout, **kw)
    ref = outputs_and_grads(naive_tensor_attention, [t.contiguous() for t in (q, k1, k2, v1, v2)], dout, **kw)
    for name, a, e in zip(NAMES, fast, ref):
        assert_close_scaled(a, e, TOL[torch.float64], name)


# x30 inputs against the float64 reference on the same (rounded) inputs, for out, dv1, dv2. Scores of order 1e5
# carry float32 rounding of about 1e-2 in absolute terms, which moves the weights of near-tied pairs by about 1%:
# measured relative errors are 3.5e-8 (out) and 6.6e-3 (dv) in float32, 2.3e-3 (out, half a bf16 ulp) and 6.9e-3
# (dv) in bfloat16. Bounds: about 4x those, and one ulp for the bf16 output.
LARGE_TOL = {torch.float64: {"out": 1e-10, "dv": 1e-10}, torch.float32: {"out": 1.5e-7, "dv": 3e-2},
             torch.bfloat16: {"out": 2**-7, "dv": 3e-2}}


@pytest.mark.usefixtures("tile_loop")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_large_scores_stay_finite_and_match_float64(dtype):
    """Inputs x30 make scores of order 1e4-1e5: without the running max exp would overflow."""
    inputs, dout, kw = run_case(CASES["padded_window"], dtype, magnitude=30.0)
    fast = outputs_and_grads(tensor_attention, inputs, dout, **kw)
    for name, t in zip(NAMES, fast):
        assert torch.isfinite(t).all(), name
    # The softmax is one-hot here, so the exact dq, dk1, dk2 are ~1e-27: sums of ~1e5-sized terms that cancel,
    # known only to rounding of those terms. Output and value gradients are well conditioned; compare those.
    ref = outputs_and_grads(naive_tensor_attention, [t.double() for t in inputs], dout.double(), **kw)
    for name, a, e in zip(NAMES, fast, ref):
        if name in ("out", "dv1", "dv2"):
            assert a.dtype == dtype
            assert_close_scaled(a.double(), e, LARGE_TOL[dtype]["out" if name == "out" else "dv"], name)


@pytest.mark.parametrize("forced", [False, True])
@pytest.mark.parametrize("windows", [(None, None), (6, 3), (3, 6)])
def test_overflowing_later_scores_stay_masked(windows, forced, monkeypatch):
    """Finite inputs whose later-key scores overflow float32 (key 12 of 20 is 3e38 in both streams): queries 0-11
    share tiles with those infinite scores and must not see them. Masks that set scores by arithmetic
    (s * 0 + floor, `Masker.apply`) would turn them into NaN; the call's score bound switches those off. With the
    switch forced on the outputs are not finite: the test fails without the switch. (Such calls end in the Python
    loop: the compiled loop reports the infinite allowed scores of the queries after key 12.)

    Forward only: the queries that use key 12 get non-finite outputs, so every gradient is non-finite here, the
    naive op's included (0 * inf in its softmax backward)."""
    if forced:
        real = tiled._score_bounds
        monkeypatch.setattr(tiled, "_score_bounds", lambda *a: (real(*a)[0], True))
    (q, k1, k2, v1, v2), _ = make_inputs(1, 2, 20, 20, 16, torch.float32)
    k1[:, :, 12], k2[:, :, 12] = 3e38, 3e38
    kw = dict(scale=0.25, w1=windows[0], w2=windows[1])
    out = tensor_attention(q, k1, k2, v1, v2, **kw)[:, :, :12]
    expected = naive_tensor_attention(*(t[:, :, :12] for t in (q, k1, k2, v1, v2)), **kw)
    if forced:
        assert not torch.isfinite(out).all()
    else:
        assert_close_scaled(out, expected, TOL[torch.float32], "out")


@pytest.mark.usefixtures("tile_loop")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_queries_without_pairs_give_zeros(dtype, tiling):
    """Pad queries before the first real token, and a sequence that is all padding, have no allowed pair."""
    B, H, T, D = 2, 2, 20, 16
    inputs, dout = make_inputs(B, H, T, T, D, dtype)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :6] = False
    mask[1] = False
    kw = dict(scale=0.25, w1=4, w2=None, attention_mask=mask)
    fast = outputs_and_grads(tensor_attention, inputs, dout, **kw)
    for name, t in zip(NAMES, fast):
        assert torch.isfinite(t).all(), name
    out, dq = fast[0], fast[1]
    assert (out[0, :, :6] == 0).all() and (out[1] == 0).all()
    assert (dq[0, :, :6] == 0).all() and (dq[1] == 0).all()
    assert all((g[1] == 0).all() for g in fast[2:])
    ref = outputs_and_grads(naive_tensor_attention, [t.double() for t in inputs], dout.double(), **kw)
    for name, a, e in zip(NAMES, fast, ref):
        assert_close_scaled(a.double(), e, TOL[dtype], name)


@pytest.mark.usefixtures("tile_loop")
@pytest.mark.parametrize("w", [None, 4])
def test_pad_query_whose_own_pair_dwarfs_its_allowed_pairs(w, tiling):
    """A pad query may not use itself; its own pair's score (x20 inputs there) must not enter its softmax, not
    even as the reference the kernel subtracts before exp (that would underflow every allowed pair)."""
    B, H, T, D, pad = 1, 2, 20, 16, 10
    inputs, dout = make_inputs(B, H, T, T, D, torch.float32)
    for t in inputs[:3]:
        t[:, :, pad] *= 20
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, pad] = False
    kw = dict(scale=0.25, w1=w, w2=w, attention_mask=mask)
    fast = outputs_and_grads(tensor_attention, inputs, dout, **kw)
    ref = outputs_and_grads(naive_tensor_attention, [t.double() for t in inputs], dout.double(), **kw)
    for name, a, e in zip(NAMES, fast, ref):
        assert_close_scaled(a.double(), e, TOL[torch.float32], name)


def test_windows_visit_only_in_window_tiles():
    """The work of a windowed call is O(T * w1 * w2): the planned tiles hold a small multiple of the used pairs."""
    T, w_row, w_col = 1024, 32, 128
    sizes = tiled.choose_tile_sizes(T, w_row, w_col)
    visited = 0
    for block in plan(T, T, w_row, w_col, None, sizes):
        rows = sum(rb.stop - rb.start for rb in block.row_blocks)
        cols = sum(cb.stop - cb.start for cb in block.col_blocks)
        visited += (block.stop - block.start) * rows * cols
    assert visited < 1.5 * T * w_row * w_col


def loop_reference(q, k1, k2, v1, v2, *, scale, w1=None, w2=None, attention_mask=None):
    """The definition written out with Python floats: softmax over the allowed pairs of each query."""
    B, H, Tq, D = q.shape
    Tk = k1.shape[2]
    q, k1, k2, v1, v2 = (t.tolist() for t in (q, k1, k2, v1, v2))
    real = attention_mask.bool().tolist() if attention_mask is not None else [[True] * Tk for _ in range(B)]
    out = torch.zeros(B, H, Tq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                t = Tk - Tq + i
                pairs = [
                    (a, c)
                    for a in range(Tk)
                    for c in range(Tk)
                    if a <= t and c <= t and (w1 is None or t - a < w1) and (w2 is None or t - c < w2)
                    and real[b][a] and real[b][c]
                ]
                if not pairs:
                    continue
                scores = [scale * sum(q[b][h][i][j] * k1[b][h][a][j] * k2[b][h][c][j] for j in range(D)) for a, c in pairs]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for j in range(D):
                    num = sum(w * v1[b][h][a][j] * v2[b][h][c][j] for w, (a, c) in zip(weights, pairs))
                    out[b, h, i, j] = num / total
    return out


@pytest.mark.parametrize(
    "Tq, Tk, w1, w2, masked",
    [(1, 1, None, None, False), (6, 6, None, None, False), (6, 6, 2, 3, False), (6, 6, 1, None, True),
     (3, 6, None, 2, True), (1, 5, 3, 1, False)],
)
def test_naive_matches_loop_definition(Tq, Tk, w1, w2, masked):
    (q, k1, k2, v1, v2), _ = make_inputs(2 if masked else 1, 1, Tq, Tk, 3, torch.float64, seed=1)
    mask = None
    if masked:
        mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1][:Tk], [1, 0, 0, 1, 1, 1, 1][:Tk]])
    kw = dict(scale=0.7, w1=w1, w2=w2, attention_mask=mask)
    torch.testing.assert_close(
        naive_tensor_attention(q, k1, k2, v1, v2, **kw), loop_reference(q, k1, k2, v1, v2, **kw), rtol=1e-12, atol=1e-12
    )


def test_loop_definition_zero_for_query_without_pairs():
    (q, k1, k2, v1, v2), _ = make_inputs(1, 1, 3, 3, 2, torch.float64)
    mask = torch.tensor([[0, 1, 1]])
    out = loop_reference(q, k1, k2, v1, v2, scale=1.0, attention_mask=mask)
    assert (out[0, 0, 0] == 0).all()
    torch.testing.assert_close(naive_tensor_attention(q, k1, k2, v1, v2, scale=1.0, attention_mask=mask), out)


def _good(B=1, H=2, Tq=5, Tk=5, D=4):
    return dict(
        q=torch.randn(B, H, Tq, D), k1=torch.randn(B, H, Tk, D), k2=torch.randn(B, H, Tk, D),
        v1=torch.randn(B, H, Tk, D), v2=torch.randn(B, H, Tk, D),
    )


@pytest.mark.parametrize(
    "change, kw, name",
    [
        (lambda t: t.update(q=t["q"][0]), {}, "q"),
        (lambda t: t.update(k2=torch.randn(1, 2, 6, 4)), {}, "k2"),
        (lambda t: t.update(v1=torch.randn(1, 2, 5, 3)), {}, "v1"),
        (lambda t: t.update(q=torch.randn(1, 2, 6, 4)), {}, "q"),
        (None, {"w1": 0}, "w1"),
        (None, {"w2": 2.5}, "w2"),
        (None, {"w1": True}, "w1"),
        (None, {"scale": "big"}, "scale"),
        (None, {"attention_mask": torch.ones(1, 4)}, "attention_mask"),
    ],
)
@pytest.mark.parametrize("fn", [tensor_attention, naive_tensor_attention])
def test_bad_inputs_raise_value_error_naming_argument(fn, change, kw, name):
    tensors = _good()
    if change is not None:
        change(tensors)
    kw = {"scale": 0.5, **kw}
    with pytest.raises(ValueError, match=f"`{name}`"):
        fn(tensors["q"], tensors["k1"], tensors["k2"], tensors["v1"], tensors["v2"], **kw)


# ---- torch.compile: the passes are custom ops, opaque to the compiler ----


@pytest.mark.usefixtures("tile_loop")
def test_custom_ops_pass_opcheck(tile_loop):
    """Fake (meta) kernels, schema and autograd registration agree with the real kernels, for both passes (the
    backward's five gradients are buffers of their own: a custom op's outputs may not alias)."""
    from hf_tensor_attn.ops.dispatch import _backward_op, _forward_op

    (q, k1, k2, v1, v2), _ = make_inputs(1, 2, 5, 7, 4, torch.float64)
    for t in (q, k1, k2, v1, v2):
        t.requires_grad_(True)
    mask = torch.ones(1, 7, dtype=torch.long)
    mask[0, :2] = 0
    for w1, w2, m in ((None, None, None), (3, 2, mask)):
        torch.library.opcheck(_forward_op, (q, k1, k2, v1, v2, 0.5, w1, w2, m, tile_loop))
        saved = [t.detach() for t in _forward_op(q, k1, k2, v1, v2, 0.5, w1, w2, m, tile_loop)]
        dout = torch.randn_like(saved[0])
        inputs = [t.detach() for t in (q, k1, k2, v1, v2)]
        torch.library.opcheck(_backward_op, (dout, *inputs, *saved, 0.5, w1, w2, m, tile_loop))


@pytest.mark.usefixtures("tile_loop")
def test_compiled_op_has_no_graph_break_and_matches_eager():
    (q, k1, k2, v1, v2), _ = make_inputs(2, 2, 9, 9, 8, torch.float32)
    for t in (q, k1, k2, v1, v2):
        t.requires_grad_(True)
    fn = lambda *x: tensor_attention(*x, scale=0.3, w1=4, w2=None)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, ref = compiled(q, k1, k2, v1, v2), fn(q, k1, k2, v1, v2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grads = torch.autograd.grad(out.square().sum(), (q, k1, k2, v1, v2))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k1, k2, v1, v2))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_unmasked_plans_and_their_tables_are_kept_masked_ones_are_not():
    """Plans depend on shapes only without a mask: kept per shape, with their packed tables."""
    sizes = TileSizes(query=4, row=8, col=16)
    kept = plan(40, 40, 6, None, None, sizes)
    assert plan(40, 40, 6, None, None, sizes) is kept
    first, second = tiled.pack(kept), tiled.pack(kept)
    assert all(a is b for a, b in zip(first, second))
    assert [t.shape[1] for t in first] == [7, 3, 3]
    mask = torch.ones(1, 40, dtype=torch.long)
    masked = plan(40, 40, 6, None, mask, sizes)
    assert masked == kept and masked is not plan(40, 40, 6, None, mask, sizes)
    assert getattr(masked, "tables", None) is None
    torch.testing.assert_close(tiled.pack(masked), first, rtol=0, atol=0)
    assert getattr(masked, "tables", None) is None
