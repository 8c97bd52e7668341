"""SubGen's hard memory bound (`max_clusters`, `budget_bytes`) on any key stream, merges that keep every estimator's
bookkeeping exact, and SubGen for the standard layers of a hybrid stack (`standard_layers="subgen"`)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from hf_tensor_attn import TensorAttnCache
from hf_tensor_attn.cache import StandardSubGenCacheLayer, TensorAttnConstants
from hf_tensor_attn.cache.subgen import SubGen2CacheLayer, SubGen4CacheLayer
from hf_tensor_attn.cache.summary import StreamSummary

NUMERATORS = ("cluster_sum", "sampled")


pytestmark = pytest.mark.usefixtures("one_thread")


def key_stream(kind: str, n: int, width: int, seed: int = 0) -> torch.Tensor:
    """[1, 2, n, width] keys. random: i.i.d. normal; clustered: 8 tight clusters; adversarial: every key farther from
    all earlier ones than any radius seen so far (a ray whose steps double in length), so it never clusters."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(1, 2, n, width, generator=g)
    if kind == "clustered":
        centers = 3 * torch.randn(1, 2, 8, width, generator=g)
        labels = torch.randint(0, 8, (1, 2, n), generator=g)
        return centers.gather(2, labels[..., None].expand(-1, -1, -1, width)) + 0.01 * torch.randn(1, 2, n, width, generator=g)
    direction = torch.randn(1, 2, 1, width, generator=g)
    steps = torch.arange(n, dtype=torch.float32) % 60  # float32 overflows past 2**127: start the ray again
    return direction * (1.1 ** steps)[None, None, :, None] * (1 + torch.arange(n)[None, None, :, None] // 60)


LAYERS = {"subgen4": (SubGen4CacheLayer, 2), "subgen2": (SubGen2CacheLayer, 2), "standard": (StandardSubGenCacheLayer, 1)}


CASES = [(layer, "cluster_sum", kind) for layer in ("subgen4", "standard") for kind in ("random", "clustered", "adversarial")]
CASES += [("subgen4", "sampled", "adversarial"), ("standard", "sampled", "random")]  # the slower numerator: fewer runs


@pytest.mark.parametrize("layer_name,numerator,kind", CASES)
def test_memory_never_exceeds_the_byte_budget(layer_name, numerator, kind):
    cls, streams = LAYERS[layer_name]
    D, n, chunk, budget = 4, 5000, 250, 6000
    layer = cls(TensorAttnConstants(scale=0.5), delta=0.1, recent_window=8, sink_tokens=2, numerator=numerator,
                cluster_samples=2, value_samples=4, budget_bytes=budget)
    k = key_stream(kind, n, streams * D)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(1))
    peak = 0
    for t in range(0, n, chunk):
        layer.update(k[:, :, t : t + chunk], v[:, :, t : t + chunk])
        out = layer.attend(torch.randn(1, 2, 1, D))  # the chunk's last position; eviction follows
        assert torch.isfinite(out).all()
        peak = max(peak, layer.memory_bytes())
    assert peak <= budget
    # The bound binds where keys do not cluster, and merging kept the count of every summarised token.
    for summary in layer._summaries():
        held = int(summary.state["n_clusters"].max())
        assert held == summary.max_clusters if kind != "clustered" else held <= summary.max_clusters
        torch.testing.assert_close(summary.state["counts"].sum(-1), torch.full((1, 2), float(layer.n_evicted)))


def test_subgen2_pair_summary_stays_under_the_budget():
    D, budget = 2, 6000
    layer = SubGen2CacheLayer(TensorAttnConstants(scale=0.5), delta=0.1, recent_window=4, sink_tokens=1,
                              budget_bytes=budget)
    k = key_stream("random", 200, 2 * D)
    v = torch.randn(k.shape)
    for t in range(0, 200, 20):
        layer.update(k[:, :, t : t + 20], v[:, :, t : t + 20])
        layer.attend(torch.randn(1, 2, 20, D))
        assert layer.memory_bytes() <= budget


@pytest.mark.parametrize("numerator", NUMERATORS)
def test_merges_keep_totals_and_a_cap_that_does_not_bind_changes_nothing(numerator):
    def run(max_clusters):
        g = torch.Generator().manual_seed(0)
        s = StreamSummary(2, 3, 4, delta=0.3, numerator=numerator, cluster_samples=3, value_samples=4,
                          dtype=torch.float64, device="cpu", generator=g, max_clusters=max_clusters)
        data = torch.Generator().manual_seed(1)
        keys = torch.randn(2, 3, 200, 4, generator=data, dtype=torch.float64)
        values = torch.randn(2, 3, 200, 4, generator=data, dtype=torch.float64)
        for t in range(0, 200, 7):
            rows = keys[:, :, t : t + 7]
            s.insert(rows, values[:, :, t : t + 7], torch.ones(rows.shape[:3], dtype=torch.float64))
        return s, keys, values

    free, keys, values = run(None)
    loose, _, _ = run(10_000)
    assert all(torch.equal(free.state[k], loose.state[k]) for k in free.state)
    capped, _, _ = run(5)
    assert int(capped.state["n_clusters"].max()) == 5 and capped.capacity == 5
    assert bool((capped.state["radius"] > 0.3).all())  # every head merged, so every radius grew
    torch.testing.assert_close(capped.state["counts"].sum(-1), torch.full((2, 3), 200.0, dtype=torch.float64))
    if numerator == "cluster_sum":
        torch.testing.assert_close(capped.state["value_sums"].sum(2), values.sum(2))
        torch.testing.assert_close(capped.state["key_sums"].sum(2), keys.sum(2))
    else:  # each merged reservoir still holds rows of the stream, and count / |R| still sums to the stream's length
        _, _, w = capped.reservoir_rows()
        torch.testing.assert_close(w.sum(-1), torch.full((2, 3), 200.0, dtype=torch.float64))
        held = capped.state["res_keys"][capped.state["res_prio"] > 0]  # [rows, 4]
        assert bool(((held[:, None] - keys.reshape(-1, 4)[None]).abs().sum(-1) == 0).any(-1).all())


@pytest.mark.parametrize("cfg,match", [
    ({"max_clusters": 0}, "max_clusters"), ({"max_clusters": 2.5}, "max_clusters"),
    ({"budget_bytes": True}, "budget_bytes"), ({"budget_bytes": -1}, "budget_bytes"),
])
def test_bad_caps_are_refused_by_name(cfg, match):
    with pytest.raises(ValueError, match=match):
        SubGen4CacheLayer(TensorAttnConstants(scale=1.0), **cfg)


def test_a_budget_below_the_exact_window_is_refused_with_its_minimum():
    layer = SubGen4CacheLayer(TensorAttnConstants(scale=1.0), recent_window=64, budget_bytes=1000)
    with pytest.raises(ValueError, match=r"budget_bytes'\]` must be at least \d+ .*got 1000"):
        layer.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))


# ---- whole models ----------------------------------------------------------------------------------------------


def hybrid(**kw):
    config = AutoConfig.for_model(
        "tensor_attn", hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, vocab_size=40,
        layer_types=["full_attention", "tensor_attention", "full_attention"], **kw,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("numerator", NUMERATORS)
def test_standard_layers_with_delta_0_equal_the_exact_cache(numerator):
    """No eviction: every method is exact. Eviction at delta=0 with cluster sums: every key is its own cluster."""
    model = hybrid().double()
    ids = torch.randint(3, 40, (2, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    exact = model(ids, attention_mask=mask).logits
    windows = [100] + ([6] if numerator == "cluster_sum" else [])
    for window in windows:
        cache = TensorAttnCache(model.config, "subgen4", {"standard_layers": "subgen", "delta": 0.0, "sink_tokens": 2,
                                                          "recent_window": window, "numerator": numerator})
        logits = [model(ids[:, :10], attention_mask=mask[:, :10], cache=cache, use_cache=True).logits]
        for t in range(10, 30):
            logits.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True).logits)
        assert isinstance(cache.layers[0], StandardSubGenCacheLayer) and isinstance(cache.layers[2], StandardSubGenCacheLayer)
        real = mask.bool()
        torch.testing.assert_close(torch.cat(logits, 1)[real], exact[real], rtol=1e-10, atol=1e-10)


class MemoryProbe(LogitsProcessor):
    """Records the cache's memory at every generation step (after the step's forward)."""

    def __init__(self, cache):
        self.cache, self.seen = cache, []

    def __call__(self, input_ids, scores):
        self.seen.append(self.cache.memory_bytes())
        return scores


@pytest.mark.parametrize("num_beams", [1, 2])
def test_whole_hybrid_cache_stays_under_its_budget_during_generate(num_beams):
    model = hybrid()
    budget = 9000  # per layer: the whole cache holds at most 3 x budget
    cache = TensorAttnCache(model.config, "subgen4", {"standard_layers": "subgen", "budget_bytes": budget,
                                                      "recent_window": 8, "sink_tokens": 2, "delta": 0.05})
    probe = MemoryProbe(cache)
    ids = torch.randint(3, 40, (1, 12), generator=torch.Generator().manual_seed(0))
    model.generate(ids, max_new_tokens=150, min_new_tokens=150, do_sample=num_beams == 1, num_beams=num_beams,
                   cache=cache, logits_processor=LogitsProcessorList([probe]), pad_token_id=0)
    assert len(probe.seen) == 150
    assert max(probe.seen) <= 3 * budget
    assert all(layer.memory_bytes() <= budget for layer in cache.layers)
    assert all(int(s.state["n_clusters"].max()) == s.max_clusters for layer in cache.layers for s in layer._summaries())


def test_subgen4_with_sampling_over_2000_tokens_stays_under_its_cap():
    """Issue 15: with do_sample, subgen4 grew from 167 KB to 461 KB over 2,000 tokens. With max_clusters it cannot."""
    config = AutoConfig.for_model("tensor_attn", hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                  intermediate_size=8, vocab_size=20)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    cap = 16
    cache = TensorAttnCache(config, "subgen4", {"max_clusters": cap, "delta": 0.01, "recent_window": 8, "sink_tokens": 2})
    probe = MemoryProbe(cache)
    model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=2000, min_new_tokens=2000, do_sample=True, cache=cache,
                   logits_processor=LogitsProcessorList([probe]), pad_token_id=0)
    layer = cache.layers[0]
    assert layer.n_evicted > 1900
    assert all(s.capacity <= cap and int(s.state["n_clusters"].max()) == cap for s in layer._summaries())
    # Memory stops growing once the summaries are full: the last 1,000 steps all hold the same bytes.
    assert len(set(probe.seen[-1000:])) == 1 and max(probe.seen) == probe.seen[-1]
