"""The `poly` layout: its decode equals the polynomial op over the whole sequence, its memory is constant in the
sequence length, batch operations act on its state, and it refuses what it cannot do (crop, windows, bad options)."""

from __future__ import annotations

import pytest
import torch

from hf_tensor_attn import TensorAttnCache
from hf_tensor_attn.cache import PolyCacheLayer, TensorAttnConstants
from hf_tensor_attn.compat import output_cache
from hf_tensor_attn.ops import poly_tensor_attention

HYBRID = ["tensor_attention", "full_attention"]


def random_states(B, H, T, Dk, Dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, T, 2 * Dk, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, T, 2 * Dv, generator=g, dtype=torch.float64)
    return q, k, v


def run_layer(layer, q, k, v, mask, prefill):
    """Prefill `prefill` tokens, then one token per step, as generate does; the outputs of every position."""
    outs = []
    for lo, hi in [(0, prefill)] + [(t, t + 1) for t in range(prefill, q.shape[2])]:
        layer.update(k[:, :, lo:hi], v[:, :, lo:hi], attention_mask=None if mask is None else mask[:, :hi])
        outs.append(layer.attend(q[:, :, lo:hi], None if mask is None else mask[:, :hi]))
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("degree,score_bound", [(2, None), (4, 2.0)])
@pytest.mark.parametrize("padded", [False, True])
def test_decode_equals_whole_sequence_op(degree, score_bound, padded, decode_loops):
    B, H, T, Dk, Dv = 3, 2, 11, 3, 5
    q, k, v = random_states(B, H, T, Dk, Dv)
    mask = None
    if padded:
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, :4], mask[2, :9] = 0, 0  # row 2: the prompt is all padding
    layer = PolyCacheLayer(TensorAttnConstants(scale=0.4), degree=degree, score_bound=score_bound)
    cached = run_layer(layer, q, k, v, mask, prefill=5)
    k1, k2 = k.chunk(2, -1)
    v1, v2 = v.chunk(2, -1)
    whole = poly_tensor_attention(q, k1, k2, v1, v2, scale=0.4, degree=degree, score_bound=score_bound,
                                  attention_mask=mask)
    torch.testing.assert_close(cached, whole, rtol=1e-10, atol=1e-10)
    assert layer.get_seq_length() == T
    assert ("product" in layer.scratch) == (decode_loops.name == "torch")  # the compiled step needs no buffer


@pytest.mark.parametrize("padded", [False, True])
def test_grouped_key_value_heads_equal_the_repeated_heads_op(padded, decode_loops):
    """4 query heads over 2 key/value heads: the state holds 2 heads and each serves its group of queries."""
    B, H, H_kv, T, Dk, Dv = 2, 4, 2, 9, 3, 4
    q = random_states(B, H, T, Dk, Dv, seed=1)[0]
    _, k, v = random_states(B, H_kv, T, Dk, Dv, seed=2)
    mask = None
    if padded:
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, :3] = 0
    layer = PolyCacheLayer(TensorAttnConstants(scale=0.4), degree=2)
    cached = run_layer(layer, q, k, v, mask, prefill=4)
    k1, k2, v1, v2 = (t.repeat_interleave(H // H_kv, dim=1) for t in (*k.chunk(2, -1), *v.chunk(2, -1)))
    whole = poly_tensor_attention(q, k1, k2, v1, v2, scale=0.4, degree=2, attention_mask=mask)
    torch.testing.assert_close(cached, whole, rtol=1e-10, atol=1e-10)
    assert layer.state.S1.shape[1] == H_kv


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_compiled_step_equals_torch_ops(dtype, tol):
    """The compiled step (`poly_step`) against its reference, the torch ops of `_decode_step`, on states past one block
    of rows (r = 153 features), three query heads per key/value head, an odd value width, strided key and value
    views, and a padded token holding NaN and inf: outputs and the whole state after the step."""
    from hf_tensor_attn.ops import extension
    from hf_tensor_attn.ops.poly.chunk import PolyState, _decode_step

    loops = extension.cpu_ops()
    if loops is None:
        pytest.skip("the compiled CPU loops could not be built here (see its RuntimeWarning)")
    B, H, G, Dk, Dv = 3, 2, 3, 16, 7
    g = torch.Generator().manual_seed(5)
    state = PolyState(*(torch.rand(*shape, generator=g, dtype=dtype) for shape in (
        (B, H, 153, Dv), (B, H, 153, Dv), (B, H, 153), (B, H, 153), (B, H, Dk), (B, H, Dk), (B, 1))))
    q = torch.randn(B, H, G, 1, Dk, generator=g, dtype=dtype)
    k1, k2 = torch.randn(B, H, 1, 2 * Dk, generator=g, dtype=dtype).chunk(2, dim=-1)
    v1, v2 = torch.randn(B, H, 1, 2 * Dv, generator=g, dtype=dtype).chunk(2, dim=-1)
    # the key mask as a view of a wider [B, 2] mask, as a float mask's last column arrives
    real = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=dtype)[:, -1:][:, None, :, None]
    k1[1], v2[1, 0] = float("nan"), float("inf")  # a padded token adds nothing, whatever it holds
    outs, states = [], []
    for step_loops in (None, loops):
        held = PolyState(*(t.clone() for t in state))
        out, held = _decode_step(held, q, k1, k2, v1, v2, real, scale=0.3, degree=2, score_bound=None,
                                 scratch={}, loops=step_loops)
        outs.append(out)
        states.append(held)
    assert outs[1].shape == (B, H, G, 1, Dv) and torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)
    for name, compiled, reference in zip(PolyState._fields, states[1], states[0]):
        torch.testing.assert_close(compiled, reference, rtol=tol, atol=tol, msg=name)
    torch.testing.assert_close(states[1].S1[1], state.S1[1], rtol=0, atol=0)  # the padded row's state is untouched


def test_compiled_step_refuses_bad_tables():
    from hf_tensor_attn.ops import extension

    loops = extension.cpu_ops()
    if loops is None:
        pytest.skip("the compiled CPU loops could not be built here (see its RuntimeWarning)")
    z = torch.zeros
    args = [z(1, 1, 3, 2), z(1, 1, 3, 2), z(1, 1, 3), z(1, 1, 3), z(1, 1, 2), z(1, 1, 2), z(1, 1), z(1, 1, 1, 1, 2),
            z(1, 1, 1, 2), z(1, 1, 1, 2), z(1, 1, 1, 2), z(1, 1, 1, 2), torch.ones(1, 1, 1, 1)]
    with pytest.raises(RuntimeError, match="bad monomial table at 2"):
        loops.poly_step(*args, torch.tensor([0, 0, 2]), torch.tensor([0, 0, 1]), torch.ones(3), 1.0)
    with pytest.raises(RuntimeError, match="expected shape"):
        loops.poly_step(*args[:-1], torch.ones(2, 1, 1, 1), torch.tensor([0, 0, 0]), torch.tensor([0, 0, 1]), torch.ones(3), 1.0)


def test_memory_bytes_identical_at_64_and_512_tokens():
    held = {}
    for n in (64, 512):
        q, k, v = random_states(2, 2, n, 4, 4)
        layer = PolyCacheLayer(TensorAttnConstants(scale=0.5), degree=2)
        run_layer(layer, q, k, v, None, prefill=n - 3)
        held[n] = layer.memory_bytes()
    assert held[64] == held[512] > 0


def test_tensor_model_poly_cache_memory_is_constant_and_generates(make_model):
    model = make_model(hidden_size=16, layer_types=HYBRID, num_attention_heads=2)
    sizes = {}
    for n in (64, 512):
        ids = torch.randint(3, 259, (1, n))
        out = model.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="poly",
                             cache_config={"degree": 2}, return_dict_in_generate=True)
        cache = output_cache(out)
        sizes[n] = cache.layers[0].memory_bytes()
        assert isinstance(cache.layers[0], PolyCacheLayer) and type(cache.layers[1]).__name__ == "DynamicLayer"
    assert sizes[64] == sizes[512]


def test_left_padded_rows_equal_rows_alone(make_model, left_padded, decode_loops):
    """Padding never enters the state: each row of a left-padded batch decodes as it does alone."""
    model = make_model(hidden_size=16, num_attention_heads=2, initializer_range=0.2)
    rows, ids, mask = left_padded([7, 4, 2])
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation="poly", cache_config={"degree": 4})
    batch = model.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1] :]
    for i, row in enumerate(rows):
        alone = model.generate(row[None], **kw)[:, len(row) :]
        assert torch.equal(batch[i : i + 1], alone)


def test_beam_search_reorders_the_state(make_model, left_padded):
    """Reordering the batch (what beam search does each step) gives the state built from the reordered rows; beam
    search through `poly` then runs (its tokens equal no-cache beam search for poly layers: tests/models)."""
    model = make_model(hidden_size=16, num_attention_heads=2, initializer_range=0.2)
    _, ids, mask = left_padded([8, 6, 3])
    cache = TensorAttnCache(model.config, "poly", {"degree": 2})
    model(ids, attention_mask=mask, cache=cache)
    index = torch.tensor([2, 0, 0])
    cache.reorder_cache(index)
    scratch = TensorAttnCache(model.config, "poly", {"degree": 2})
    model(ids[index], attention_mask=mask[index], cache=scratch)
    for a, b in zip(cache.layers[0].state, scratch.layers[0].state):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False,
                         cache_implementation="poly")
    assert out.shape == (3, ids.shape[1] + 4)


def test_sampling_runs(make_model):
    model = make_model(hidden_size=16, num_attention_heads=2)
    torch.manual_seed(1)
    out = model.generate(torch.randint(3, 259, (2, 5)), max_new_tokens=4, do_sample=True, cache_implementation="poly")
    assert out.shape == (2, 9)


def test_crop_raises_clearly(make_model):
    model = make_model(hidden_size=16, num_attention_heads=2)
    cache = TensorAttnCache(model.config, "poly")
    model(torch.randint(3, 259, (1, 5)), cache=cache)
    with pytest.raises(NotImplementedError, match="'poly' cannot crop: its state is a sum"):
        cache.crop(-1)


def test_windows_refused_by_name(make_model):
    model = make_model(hidden_size=16, num_attention_heads=2, w1=4)
    with pytest.raises(ValueError, match="cannot apply the model's windows w1=4, w2=None"):
        TensorAttnCache(model.config, "poly")


@pytest.mark.parametrize(
    "cache_config, match",
    [
        ({"degree": 0}, r"`cache_config\['degree'\]`: `degree` must be an even int >= 2.*got 0"),
        ({"degree": 1}, r"`cache_config\['degree'\]`: `degree` must be an even int >= 2.*got 1"),
        ({"degree": 3}, r"`cache_config\['degree'\]`: `degree` must be an even int >= 2.*got 3"),
        ({"score_bound": 300.0}, r"`cache_config\['score_bound'\]`: `score_bound` must be .*<= 42.0.*got 300.0"),
        ({"score_bound": 42.0, "degree": 8}, r"`cache_config\['score_bound'\]`.*use score_bound <= 39.9"),
        ({"degree": 2.5}, r"`cache_config\['degree'\]`.*got 2.5"),
        ({"score_bound": -1.0}, r"`cache_config\['score_bound'\]`.*finite float > 0.*got -1.0"),
        ({"score_bound": float("inf")}, r"`cache_config\['score_bound'\]`.*got inf"),
        ({"window": 3}, r"allowed keys: \['degree', 'score_bound'\]"),
    ],
)
def test_bad_cache_config_raises(make_model, cache_config, match):
    model = make_model(hidden_size=16, num_attention_heads=2)
    with pytest.raises(ValueError, match=match):
        model.generate(torch.randint(3, 259, (1, 3)), max_new_tokens=1, cache_implementation="poly",
                       cache_config=cache_config)


def test_tensor_model_through_poly_cache_approaches_exact_when_scores_are_small(make_model, left_padded):
    """With small scores (default init) a degree-6 Taylor P is exp to rounding: the cached logits equal the exact
    model's. A wrong scale or a dropped pair would show at the size of the scores (~1e-4), far above 1e-10."""
    model = make_model(hidden_size=16, num_attention_heads=2, layer_types=HYBRID, position_embedding_type="none")
    _, ids, mask = left_padded([7, 4])
    exact = model(ids, attention_mask=mask, use_cache=False).logits
    cache = TensorAttnCache(model.config, "poly", {"degree": 6})
    steps = [model(ids[:, :3], attention_mask=mask[:, :3], cache=cache).logits]
    for t in range(3, ids.shape[1]):
        steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], exact[real], rtol=1e-10, atol=1e-10)
    # The Chebyshev fit on [-2, 2] has P'(0) = 0.95, not 1: off by about 0.05 s near 0.
    wrong = TensorAttnCache(model.config, "poly", {"degree": 4, "score_bound": 2.0})
    assert not torch.allclose(model(ids, attention_mask=mask, cache=wrong).logits[real], exact[real],
                              rtol=1e-10, atol=1e-10)


# Issue #35: settings of the poly cache that returned NaN or were OOM-killed.
@pytest.mark.parametrize("score_bound", [1e-30, 2.0])
def test_accepted_score_bounds_generate_finite_logits(make_model, score_bound):
    model = make_model(hidden_size=16, num_attention_heads=2).float()
    out = model.generate(torch.randint(3, 259, (1, 4)), max_new_tokens=3, do_sample=False, cache_implementation="poly",
                         cache_config={"degree": 4, "score_bound": score_bound}, output_logits=True,
                         return_dict_in_generate=True)
    assert all(torch.isfinite(step).all() for step in out.logits)


def test_feature_count_past_the_guard_is_refused_before_allocating(make_model):
    """head_dim 16, degree 12: 30M features per head, OOM-killed at 22 GB."""
    from hf_tensor_attn.cache.poly import PolyCacheMemoryError

    model = make_model(hidden_size=32, num_attention_heads=2)  # head_dim 16
    with pytest.raises(PolyCacheMemoryError, match=r"'poly': `degree`=12 with feature width 16 .*use degree <= 8"):
        model.generate(torch.randint(3, 259, (1, 3)), max_new_tokens=1, cache_implementation="poly",
                       cache_config={"degree": 12})


def test_state_past_the_memory_guard_is_refused_naming_its_size(make_model, monkeypatch):
    from hf_tensor_attn.cache import poly

    monkeypatch.setattr(poly, "default_memory_budget", lambda device: 10_000)
    model = make_model(hidden_size=16, num_attention_heads=2)
    with pytest.raises(poly.PolyCacheMemoryError, match=r"degree=4 holds r = 495 features per head: .* past the "
                                                        r"guard of 10,000 bytes"):
        model.generate(torch.randint(3, 259, (1, 3)), max_new_tokens=1, cache_implementation="poly",
                       cache_config={"degree": 4})
