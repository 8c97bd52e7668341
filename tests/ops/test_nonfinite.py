"""NaN containment (issue #15): a NaN or an infinity in one input changes exactly the output rows that the
definition says it changes, in the naive reference and in every fast path (tiled prefill, decode, the two-matrix
pair rows; the cache layouts' read paths are in tests/cache/test_cache_nonfinite.py). Positions a query may not use (later keys, outside a window, padding)
never contribute, whatever they hold."""

from __future__ import annotations

import pytest
import torch

from hf_tensor_attn.ops import dispatch, four_cache_decode, naive_tensor_attention, tensor_attention
from hf_tensor_attn.ops.exact import tiled
from hf_tensor_attn.ops.exact.tiles import TileSizes

B, H, T, D = 2, 2, 20, 4
NAMES = ("q", "k1", "k2", "v1", "v2")


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in NAMES]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0  # sequence 0 is left-padded by three tokens
    return tensors, mask


def poison(tensors, name, position, value):
    """Copies with `value` in one entry of batch 0, head 1: input `name` at key position `position`."""
    out = [t.clone() for t in tensors]
    out[NAMES.index(name)][0, 1, position, 1] = value
    return out


def expected_rows(position, window, masked):
    """[T] bool: the queries (batch 0, head 1) that may use key `position` of a stream with `window`."""
    t = torch.arange(T)
    uses = (position <= t) & ((t - position < window) if window else True)
    if masked and position < 3:
        uses &= False  # a padded key is used by nobody
    return uses


def assert_same_rows(actual, expected):
    """Same non-finite entries, and the finite ones equal to the reference's."""
    bad = ~torch.isfinite(expected)
    assert torch.equal(~torch.isfinite(actual), bad), "non-finite rows differ from the naive op's"
    torch.testing.assert_close(actual.masked_fill(bad, 0), expected.masked_fill(bad, 0), rtol=1e-10, atol=1e-10)


# (input, key position, value, windows, masked): a later key (the case: it poisoned the whole 16-query
# tile), a padded key and value, a key outside a window, a used value.
CASES = [
    ("k2", 10, float("nan"), (None, None), False),
    ("k1", 10, float("inf"), (None, None), False),
    ("v1", 10, float("nan"), (None, None), False),
    ("v2", 1, float("nan"), (None, None), True),
    ("k1", 1, float("-inf"), (None, None), True),
    ("k1", 5, float("nan"), (3, None), False),
    ("v2", 5, float("inf"), (None, 4), True),
    ("q", 7, float("nan"), (None, None), False),
]


@pytest.mark.parametrize("name, position, value, windows, masked", CASES)
def test_naive_changes_exactly_the_rows_that_use_the_position(name, position, value, windows, masked):
    tensors, mask = inputs()
    kw = dict(scale=0.5, w1=windows[0], w2=windows[1], attention_mask=mask if masked else None)
    out = naive_tensor_attention(*poison(tensors, name, position, value), **kw)
    clean = naive_tensor_attention(*tensors, **kw)
    window = {"k1": windows[0], "v1": windows[0], "k2": windows[1], "v2": windows[1]}.get(name)
    rows = expected_rows(position, window, masked) if name != "q" else torch.arange(T) == position
    assert torch.equal((~torch.isfinite(out[0, 1])).any(-1), rows)
    keep = torch.ones(B, H, T, dtype=torch.bool)
    keep[0, 1] = ~rows
    torch.testing.assert_close(out[keep], clean[keep], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tiles", [None, TileSizes(query=16, row=8, col=8), TileSizes(query=3, row=5, col=7)])
@pytest.mark.parametrize("name, position, value, windows, masked", CASES)
def test_tiled_changes_the_rows_naive_changes(name, position, value, windows, masked, tiles, monkeypatch):
    if tiles is not None:
        monkeypatch.setattr(tiled, "choose_tile_sizes", lambda *args, **kw: tiles)
    tensors, mask = inputs()
    kw = dict(scale=0.5, w1=windows[0], w2=windows[1], attention_mask=mask if masked else None)
    poisoned = poison(tensors, name, position, value)
    assert_same_rows(tensor_attention(*poisoned, **kw), naive_tensor_attention(*poisoned, **kw))


def test_tiled_gradients_of_unaffected_inputs_stay_finite():
    """A NaN in a later key leaves the earlier rows' gradients what they are without it."""
    tensors, _ = inputs()
    poisoned = poison(tensors, "k2", 15, float("nan"))
    grads = []
    for ts in (tensors, poisoned):
        leaves = [t.clone().requires_grad_(True) for t in ts]
        tensor_attention(*leaves, scale=0.5)[:, :, :15].sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for clean, dirty in zip(*grads):
        torch.testing.assert_close(dirty, clean, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name, position", [("v1", 1), ("v2", 0), ("k1", 2), ("k2", 1), ("v1", 12), ("k2", 19)])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("grad", [False, True])
def test_four_cache_decode_ignores_padded_positions(name, position, value, grad, decode_loops):
    """The issue's case: a NaN in a padded value row made `four_cache_decode` return NaN."""
    tensors, mask = inputs()
    q, *streams = poison(tensors, name, position, value)
    q = q[:, :, -1:]
    ref = naive_tensor_attention(q, *streams, scale=0.5, attention_mask=mask)
    with torch.set_grad_enabled(grad):
        leaves = [t.requires_grad_(grad) for t in (q, *streams)]
        out = four_cache_decode(*leaves, scale=0.5, attention_mask=mask)
    assert_same_rows(out.detach(), ref)
    assert bool(torch.isfinite(out).all()) == (position < 3)  # padded: contained; real: it is used
    if grad:
        decode_loops.skip_check()  # a gradient takes the tiled op, not a decode step


# Issue #35: finite values near float32's maximum.
@pytest.mark.parametrize("magnitude", [3e37, 1e38, 3e38])
@pytest.mark.parametrize("which", ["v1", "v2"])
def test_huge_finite_values_overflow_only_where_the_true_output_does(magnitude, which):
    """The tiles sum unnormalised weights times v1 * v2: |v1| = 1e38 gave 51 of 80 entries non-finite (the float32
    reference none; at 3e38 80 of 80, the true output overflows in 2). Now the entries that the float64 reference
    puts past float32's maximum, and no others, are non-finite; the rest agree with it."""
    g = torch.Generator().manual_seed(0)
    q, k1, k2, v1, v2 = (torch.randn(1, 2, 5, 8, generator=g) for _ in NAMES)
    values = {"v1": v1, "v2": v2}
    values[which] = values[which].sign() * magnitude
    args = (q, k1, k2, values["v1"], values["v2"])
    out = tensor_attention(*args, scale=0.5)
    exact = naive_tensor_attention(*(t.double() for t in args), scale=0.5)
    overflows = exact.abs() > torch.finfo(torch.float32).max
    assert torch.equal(~torch.isfinite(out), overflows)
    finite = exact[~overflows]
    # float32 relative to the largest entry: an entry near 0 is a difference of terms of the values' magnitude
    torch.testing.assert_close(out[~overflows].double(), finite, rtol=1e-5, atol=1e-5 * finite.abs().max().item())


def test_huge_values_are_rescaled_only_after_a_non_finite_output(monkeypatch):
    """The second pass is the exception: finite outputs never pay for it."""
    calls = []
    real = dispatch._with_values_rescaled
    monkeypatch.setattr(dispatch, "_with_values_rescaled", lambda *a: calls.append(1) or real(*a))
    tensors, _ = inputs()
    tensor_attention(*(t.float() for t in tensors), scale=0.5)
    assert calls == []
    q, k1, k2, v1, v2 = (t.float() for t in tensors)
    tensor_attention(q, k1, k2, v1.sign() * 1e38, v2, scale=0.5)
    assert calls == [1]
