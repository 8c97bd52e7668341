"""The cache layouts (four matrices, paper Def. 3.7; two matrices, Def. 3.8): same outputs as no cache, the cache
API transformers uses (crop, beam reordering, batch selection), memory accounting, the memory guard, and the
decode kernels against the naive reference. No test here looks at wall-clock time: speed is
`scripts/bench/bench_cache.py`'s job."""

from __future__ import annotations

import pytest
import torch

from hf_tensor_attn import TensorAttnCache
from hf_tensor_attn.cache import (
    LAYOUTS,
    TensorAttnConstants,
    TensorAttnCacheLayer,
    TwoCacheLayer,
    TwoCacheMemoryError,
    register_layout,
)
from hf_tensor_attn.cache import two as two_module
from hf_tensor_attn.ops import naive_tensor_attention
from hf_tensor_attn.compat import output_cache

LAYOUT_NAMES = ["four_cache", "two_cache"]
HYBRID = ["tensor_attention", "full_attention"]
CONFIGS = {
    "plain": {},
    "windowed": {"w1": 4, "w2": 3},
    "hybrid": {"layer_types": HYBRID},
    "hybrid_windowed": {"layer_types": HYBRID, "w1": 2, "w2": 5},
}
# A larger init than the default 0.02 so attention moves the logits enough for a wrong cache to show.
INIT = 0.2


def fill(model, ids, layout, *, prefill, mask=None):
    """A cache built the way generate builds it: a prefill of `prefill` tokens, then one token per step."""
    cache = TensorAttnCache(model.config, layout)
    am = lambda n: None if mask is None else mask[:, :n]  # noqa: E731
    logits = [model(ids[:, :prefill], attention_mask=am(prefill), cache=cache).logits]
    for t in range(prefill, ids.shape[1]):
        logits.append(model(ids[:, t : t + 1], attention_mask=am(t + 1), cache=cache).logits)
    return cache, torch.cat(logits, 1)


def layer_state(layer):
    if isinstance(layer, TwoCacheLayer):
        P = layer.num_pairs
        return {
            "seen": layer.seen,
            "first": layer.first,
            "keys": layer.keys,
            "values": layer.values,
            "pair_index": layer.pair_index[:, :P],
            "pair_keys": layer.pair_keys[:, :, :P],
            "pair_values": layer.pair_values[:, :, :P],
        }
    return {"seen": layer.get_seq_length(), "keys": layer.keys, "values": layer.values}


def assert_same_cache(actual, expected):
    assert len(actual.layers) == len(expected.layers)
    for i, (a, e) in enumerate(zip(actual.layers, expected.layers)):
        assert type(a) is type(e)
        sa, se = layer_state(a), layer_state(e)
        assert sa.keys() == se.keys()
        for key in sa:
            if isinstance(se[key], torch.Tensor) and se[key].is_floating_point():
                torch.testing.assert_close(sa[key], se[key], rtol=1e-12, atol=1e-12, msg=lambda m: f"layer {i} {key}: {m}")
            elif isinstance(se[key], torch.Tensor):
                assert torch.equal(sa[key], se[key]), f"layer {i} {key}"
            else:
                assert sa[key] == se[key], f"layer {i} {key}"


# ---- generate: every layout gives the tokens of no cache ----


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_tokens_identical_across_layouts_and_no_cache(make_model, name):
    model = make_model(initializer_range=INIT, **CONFIGS[name])
    ids = torch.randint(3, 259, (2, 6))
    kw = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    ref = model.generate(ids, use_cache=False, **kw)
    for layout in LAYOUT_NAMES:
        out = model.generate(ids, cache_implementation=layout, **kw)
        assert isinstance(output_cache(out).layers[0], LAYOUTS[layout])
        assert torch.equal(out.sequences, ref.sequences), layout
        # generate hands out float32 logits, so float32 rounding is all that may differ
        torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("name", ["plain", "hybrid_windowed"])
def test_beam_search_on_left_padded_batch_matches_no_cache(make_model, layout, name, left_padded):
    model = make_model(initializer_range=INIT, **CONFIGS[name])
    _, ids, mask = left_padded([7, 4, 2])
    kw = dict(num_beams=3, num_return_sequences=2, do_sample=False, max_new_tokens=6, return_dict_in_generate=True,
              output_scores=True)
    ref = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
    out = model.generate(ids, attention_mask=mask, cache_implementation=layout, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("name", ["plain", "windowed"])
def test_left_padded_batch_rows_match_each_row_alone(make_model, layout, name, left_padded):
    model = make_model(initializer_range=INIT, **CONFIGS[name])
    rows, ids, mask = left_padded([7, 4, 1])
    width = ids.shape[1]
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation=layout)
    batched = model.generate(ids, attention_mask=mask, **kw)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], **kw)
        assert torch.equal(batched[i, width:], alone[0, len(r) :])


@pytest.mark.parametrize("name", CONFIGS)
def test_two_cache_prefill_chunks_and_decode_match_full_forward(make_model, name, left_padded):
    model = make_model(initializer_range=INIT, **CONFIGS[name])
    _, ids, mask = left_padded([13, 9])
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache = TensorAttnCache(model.config, "two_cache")
    steps = [model(ids[:, :5], attention_mask=mask[:, :5], cache=cache).logits]
    steps.append(model(ids[:, 5:9], attention_mask=mask[:, :9], cache=cache).logits)  # Tq > 1 continuation
    for t in range(9, 13):
        steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
    real = mask.bool()  # pad positions have no defined output
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-10, atol=1e-10)
    assert cache.get_seq_length() == 13


# ---- memory ----


def test_memory_bytes_linear_for_four_quadratic_for_two(make_model):
    model = make_model()  # float64, 2 tensor layers, H = 2, D = 16
    B, H, D, L, e = 2, 2, 16, 2, 8
    ids = torch.randint(3, 259, (B, 64))
    held = {}
    for layout in LAYOUT_NAMES:
        for n in (8, 64):
            cache = TensorAttnCache(model.config, layout)
            model(ids[:, :n], cache=cache)
            held[layout, n] = cache.memory_bytes()
    # four: K (k1 | k2) and V (v1 | v2), [B, H, n, 2D] each (a prefill allocates exactly n tokens)
    for n in (8, 64):
        assert held["four_cache", n] == L * 2 * B * H * n * 2 * D * e
    # two: n^2 pair rows of K̃ and Ṽ ([B, H, n^2, D] each; one prefill allocates exactly n^2 rows), two int64
    # indices per row, and the two token streams kept to form the next pairs
    for n in (8, 64):
        assert held["two_cache", n] == L * (n * n * (2 * B * H * D * e + 2 * 8) + 2 * B * H * n * 2 * D * e)
    assert held["four_cache", 64] == 8 * held["four_cache", 8]
    assert held["two_cache", 64] > 50 * held["two_cache", 8]


def test_two_cache_appends_2i_plus_1_pairs_per_token_and_grows_by_doubling(make_model):
    model = make_model(num_hidden_layers=1)
    B, H, D, e = 1, 2, 16, 8
    ids = torch.randint(3, 259, (B, 40))
    cache = TensorAttnCache(model.config, "two_cache")
    layer = cache.layers[0]
    model(ids[:, :5], cache=cache)
    capacity, growths = 25, 0
    for t in range(5, 40):
        model(ids[:, t : t + 1], cache=cache)
        assert layer.num_pairs == (t + 1) ** 2  # token t added its 2t + 1 pairs
        if (t + 1) ** 2 > capacity:  # the rule: at least double
            capacity, growths = max((t + 1) ** 2, 2 * capacity), growths + 1
        assert layer.pair_keys.shape[2] == capacity
        expected = capacity * (2 * B * H * D * e + 2 * 8) + 2 * B * H * (t + 1) * 2 * D * e
        assert layer.memory_bytes() == cache.memory_bytes() == expected
    assert growths <= 6  # 25 -> 1600 rows in O(log) copies, not one per token


def test_four_cache_buffers_grow_by_doubling(make_model):
    model = make_model(num_hidden_layers=1)
    B, H, D, e = 1, 2, 16, 8
    ids = torch.randint(3, 259, (B, 40))
    cache = TensorAttnCache(model.config, "four_cache")
    model(ids[:, :5], cache=cache)
    capacity = 5
    for t in range(5, 40):
        model(ids[:, t : t + 1], cache=cache)
        capacity = max(t + 1, 2 * capacity) if t + 1 > capacity else capacity
        assert cache.layers[0].keys.shape[2] == t + 1
        assert cache.memory_bytes() == 2 * B * H * capacity * 2 * D * e  # K and V buffers, spare capacity included
    assert capacity == 40  # 5 -> 10 -> 20 -> 40: three copies for 35 appended tokens


def test_two_cache_with_windows_holds_only_the_window_pairs(make_model):
    model = make_model(num_hidden_layers=1, w1=4, w2=3)
    ids = torch.randint(3, 259, (1, 60))
    cache, _ = fill(model, ids[:, :30], "two_cache", prefill=10)
    layer = cache.layers[0]
    assert layer.num_pairs == 4 * 3  # a in the last 4 positions, b in the last 3
    assert layer.keys.shape[2] == 4  # and the token streams only as far back as the longer window
    held = cache.memory_bytes()
    for t in range(30, 60):
        model(ids[:, t : t + 1], cache=cache)
    assert cache.memory_bytes() == held  # constant in the context length
    # a long prefill forms only the band of pairs some query can use: b - a < w1 and a - b < w2
    cache = TensorAttnCache(model.config, "two_cache")
    model(ids, cache=cache)
    a, b = cache.layers[0].pair_index[:, : cache.layers[0].num_pairs]
    assert bool(((b - a < 4) & (a - b < 3)).all()) and cache.layers[0].num_pairs < 60 * 7


# ---- cache API: equal to building from scratch ----


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_crop_equals_building_from_scratch(make_model, layout):
    model = make_model(layer_types=HYBRID)
    ids = torch.randint(3, 259, (2, 10))
    cache, _ = fill(model, ids[:, :9], layout, prefill=6)
    cache.crop(-4)
    scratch, _ = fill(model, ids[:, :5], layout, prefill=5)
    assert cache.get_seq_length() == 5
    assert_same_cache(cache, scratch)
    nxt = model(ids[:, 5:6], cache=cache).logits
    torch.testing.assert_close(nxt, model(ids[:, 5:6], cache=scratch).logits, rtol=1e-12, atol=1e-12)
    cache.crop(0)
    assert cache.get_seq_length() == 6
    with pytest.raises(ValueError, match="negative"):
        cache.crop(2)


@pytest.mark.parametrize("name", ["plain", "windowed"])
def test_prompt_lookup_decoding_crops_both_layouts_correctly(make_model, name):
    # assisted decoding verifies drafted tokens in one Tq > 1 forward and crops the rejected ones from the cache
    model = make_model(initializer_range=INIT, **CONFIGS[name])
    ids = torch.randint(3, 20, (1, 12)).repeat(1, 2)
    ref = model.generate(ids, max_new_tokens=15, do_sample=False, use_cache=False)
    for layout in LAYOUT_NAMES:
        out = model.generate(ids, max_new_tokens=15, do_sample=False, prompt_lookup_num_tokens=3, cache_implementation=layout)
        assert torch.equal(out, ref), layout


def test_two_cache_crop_with_windows(make_model):
    model = make_model(num_hidden_layers=1, w1=3, w2=2)
    ids = torch.randint(3, 259, (1, 16))
    cache, _ = fill(model, ids[:, :12], "two_cache", prefill=6)
    cache.crop(-1)  # what generate's rollback and assisted decoding need: back to the last forward's first position
    _, full = fill(model, ids[:, :13], "four_cache", prefill=6)
    logits = model(ids[:, 11:13], cache=cache).logits  # a 2-token continuation after the crop
    torch.testing.assert_close(logits, full[:, 11:13], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="dropped the pairs"):
        cache.crop(-5)  # those queries would need pairs the windows already dropped


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize(
    "op, batch_map",
    [
        ("reorder_cache", torch.tensor([2, 0, 0])),
        ("batch_select_indices", torch.tensor([0, 2])),
        ("batch_repeat_interleave", 2),
    ],
)
def test_batch_ops_equal_building_from_scratch(make_model, layout, op, batch_map, left_padded):
    model = make_model(layer_types=HYBRID, w1=5)
    rows, ids, mask = left_padded([8, 6, 3])
    cache, _ = fill(model, ids, layout, prefill=5, mask=mask)
    getattr(cache, op)(batch_map)
    if op == "batch_repeat_interleave":
        ids, mask = ids.repeat_interleave(batch_map, 0), mask.repeat_interleave(batch_map, 0)
    else:
        ids, mask = ids[batch_map], mask[batch_map]
    scratch, _ = fill(model, ids, layout, prefill=5, mask=mask)
    assert_same_cache(cache, scratch)


def test_cache_api_basics(make_model):
    model = make_model(layer_types=HYBRID)
    ids = torch.randint(3, 259, (2, 6))
    for layout in LAYOUT_NAMES:
        cache = TensorAttnCache(model.config, layout)
        assert cache.get_seq_length() == 0 and cache.memory_bytes() == 0
        model(ids, cache=cache)
        layer = cache.layers[0]
        assert layer.get_seq_length() == 6 and layer.get_mask_sizes(1) == (7, 0) and layer.get_max_length() == -1
        assert cache.get_max_length() == -1 and cache.is_croppable
        layer.offload()
        layer.prefetch()
        assert layer.keys.device.type == "cpu"
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.memory_bytes() == 0
        # a reset cache is reusable
        torch.testing.assert_close(
            model(ids, cache=cache).logits, model(ids, use_cache=False).logits, rtol=1e-10, atol=1e-10
        )
    # early initialisation (what transformers' export recipes call) gives empty, usable layers
    cache = TensorAttnCache(model.config, "two_cache")
    cache.early_initialization(2, 2, 32, torch.float64, torch.device("cpu"))
    assert cache.layers[0].is_initialized and cache.get_seq_length() == 0
    model(ids, cache=cache)
    assert cache.get_seq_length() == 6


# ---- errors ----


def test_unknown_cache_implementation_lists_the_layouts(make_model):
    model = make_model()
    ids = torch.randint(3, 259, (1, 4))
    with pytest.raises(ValueError, match="four_cache") as info:
        model.generate(ids, cache_implementation="three_cache", max_new_tokens=2)
    assert "two_cache" in str(info.value)
    with pytest.raises(ValueError, match="four_cache"):
        TensorAttnCache(model.config, "three_cache")


@pytest.mark.parametrize(
    "layout, cache_config, match",
    [
        ("two_cache", {"max_memory_bytes": -5}, "max_memory_bytes"),
        ("two_cache", {"max_memory_bytes": "1GB"}, "positive int"),
        ("two_cache", {"max_memory_bytes": True}, "max_memory_bytes"),
        ("two_cache", {"max_bytes": 10}, "max_bytes"),
        ("four_cache", {"max_memory_bytes": 10}, "max_memory_bytes"),
    ],
)
def test_bad_cache_config_raises(make_model, layout, cache_config, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        model.generate(torch.randint(3, 259, (1, 4)), cache_implementation=layout, cache_config=cache_config,
                       max_new_tokens=2)


def test_two_cache_over_budget_raises_a_clear_memory_error(make_model):
    model = make_model(num_hidden_layers=2)  # float64, B = 1, H = 2, D = 16: 528 bytes per pair row and layer
    ids = torch.randint(3, 259, (1, 8))
    budget = 200_000
    with pytest.raises(TwoCacheMemoryError) as info:
        model.generate(ids, cache_implementation="two_cache", cache_config={"max_memory_bytes": budget},
                       max_new_tokens=30, do_sample=False)
    message = str(info.value)
    assert isinstance(info.value, MemoryError)
    assert f"max_memory_bytes={budget:,}" in message and "needs" in message
    for suggestion in ("four_cache", "subgen4", "subgen2"):
        assert suggestion in message
    # the same budget is enough for the four-matrix layout's whole run
    model.generate(ids, cache_implementation="four_cache", max_new_tokens=30, do_sample=False)


def test_two_cache_refuses_before_building_the_indices_of_the_pairs(make_model, monkeypatch):
    """The guard counted the rows but ran after their (a, b) indices were built, about ten int64 numbers per pair:
    a refusal came after a 342 MiB rise. Now the count comes first, and indices are built in bounded groups."""
    built = []  # rows of each group of indices built
    real = TwoCacheLayer._new_pairs

    def recording(self, *args):
        pairs = real(self, *args)
        built.append(pairs.shape[1])
        return pairs

    monkeypatch.setattr(TwoCacheLayer, "_new_pairs", recording)
    model = make_model(num_hidden_layers=1)
    ids = torch.randint(3, 259, (1, 64))
    with pytest.raises(TwoCacheMemoryError):
        model(ids, cache=TensorAttnCache(model.config, "two_cache", {"max_memory_bytes": 100_000}))
    assert built == []
    monkeypatch.setattr(two_module, "_PAIRS_PER_STEP", 100)
    model(ids, cache=TensorAttnCache(model.config, "two_cache"))
    # 64^2 rows, in groups of whole shells (shell s holds 2s + 1 rows) of at most 100 rows past the first shell
    assert sum(built) == 64 * 64 and len(built) > 1 and max(built) <= 100 + 2 * 63 + 1


def test_two_cache_budget_counts_every_layer_of_its_cache_only(make_model):
    model = make_model(num_hidden_layers=2)
    ids = torch.randint(3, 259, (1, 16))
    one_layer = 16 * 16 * (2 * 1 * 2 * 16 * 8 + 16) + 2 * 1 * 2 * 16 * 32 * 8
    budget = {"max_memory_bytes": one_layer + one_layer // 2}
    cache = TensorAttnCache(model.config, "two_cache", budget)
    with pytest.raises(TwoCacheMemoryError):
        model(ids, cache=cache)  # the first layer fits, the second would pass the budget
    assert cache.layers[0].memory_bytes() == one_layer
    # Another cache (another generate call, another model) has a budget of its own.
    one_layer_model = make_model(num_hidden_layers=1)
    held = [TensorAttnCache(one_layer_model.config, "two_cache", budget) for _ in range(3)]
    for other in held:
        one_layer_model(ids, cache=other)
    assert all(other.memory_bytes() == one_layer for other in held)


@pytest.mark.parametrize("windows", [(None, None), (3, None), (None, 2), (4, 3), (1, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_two_cache_layer_attend_matches_naive(monkeypatch, windows, masked):
    # small blocks, gathers and index groups so the query-block loop and the chunked row formation run many times
    monkeypatch.setattr(two_module, "_SCORES_PER_BLOCK", 200)
    monkeypatch.setattr(two_module, "_GATHER_ELEMENTS", 50)
    monkeypatch.setattr(two_module, "_PAIRS_PER_STEP", 4)
    B, H, D, chunks = 2, 3, 5, (5, 3, 1, 1, 6, 1, 1)
    T = sum(chunks)
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(B, H, T, 2 * D, generator=g, dtype=torch.float64) for _ in range(2))
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3], mask[1, 6] = 0, 0
    w1, w2 = windows
    layer = TwoCacheLayer(TensorAttnConstants(scale=0.3, w1=w1, w2=w2))
    seen = 0
    for c in chunks:
        layer.update(k[:, :, seen : seen + c], v[:, :, seen : seen + c])
        seen += c
        m = mask[:, :seen] if masked else None
        out = layer.attend(q[:, :, seen - c : seen], m)
        k1, k2 = k[:, :, :seen].chunk(2, -1)
        v1, v2 = v[:, :, :seen].chunk(2, -1)
        ref = naive_tensor_attention(q[:, :, seen - c : seen], k1, k2, v1, v2, scale=0.3, w1=w1, w2=w2, attention_mask=m)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, msg=lambda msg: f"after {seen} tokens: {msg}")


# ---- the protocol: a new layout is one class and one decorator ----


def test_a_registered_toy_layout_generates_without_touching_the_model(make_model, left_padded):
    @register_layout("toy_concat")
    class ToyConcatLayer(TensorAttnCacheLayer):
        """Keeps every token by concatenation and attends with the reference op."""

        def allocate(self, key_states, value_states):
            self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]

        def append(self, key_states, value_states, attention_mask):
            self.keys, self.values = torch.cat([self.keys, key_states], 2), torch.cat([self.values, value_states], 2)

        def read(self, query, attention_mask):
            (k1, k2), (v1, v2), c = self.keys.chunk(2, -1), self.values.chunk(2, -1), self.constants
            return naive_tensor_attention(query, k1, k2, v1, v2, scale=c.scale, w1=c.w1, w2=c.w2,
                                          attention_mask=attention_mask)

        def map_batch(self, fn):
            self.keys, self.values = fn(self.keys), fn(self.values)

        def move(self, device):
            self.map_batch(lambda t: t.to(device))

        def memory_bytes(self):
            return 0 if not self.is_initialized else 2 * self.keys.numel() * self.keys.element_size()

    try:
        model = make_model(initializer_range=INIT, layer_types=HYBRID, w1=4, w2=3)
        _, ids, mask = left_padded([7, 4, 2])
        kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        ref = model.generate(ids, use_cache=False, **kw)
        out = model.generate(ids, cache_implementation="toy_concat", **kw)
        assert torch.equal(out.sequences, ref.sequences)
        assert isinstance(output_cache(out).layers[0], ToyConcatLayer)
        beams = dict(num_beams=2, attention_mask=mask, max_new_tokens=5, do_sample=False)
        assert torch.equal(model.generate(ids, cache_implementation="toy_concat", **beams),
                           model.generate(ids, use_cache=False, **beams))
        # the config takes its name from the registry too
        assert make_model(default_cache_implementation="toy_concat").config.default_cache_implementation == "toy_concat"
    finally:
        del LAYOUTS["toy_concat"]


def test_layer_update_refuses_unknown_keywords(make_model):
    layer = TensorAttnCache(make_model().config).layers[0]
    k = torch.randn(1, 2, 3, 32, dtype=torch.float64)
    with pytest.raises(TypeError, match="position_ids"):
        layer.update(k, k, position_ids=None)
