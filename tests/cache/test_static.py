"""The static layout (`static_four_cache`): buffers allocated once, compiled decoding without graph breaks, the same
tokens as `four_cache`, and `torch.compile(model, fullgraph=True)` of a plain forward whatever the default layout."""

import pytest
import torch
from transformers import CompileConfig

from hf_tensor_attn import TensorAttnCache
from hf_tensor_attn.cache import LAYOUTS, StaticFourCacheLayer, TensorAttnConstants
from hf_tensor_attn.compat import output_cache

HYBRID = ["tensor_attention", "full_attention"]


def compile_config(**kwargs) -> CompileConfig:
    """`generate` compiles its decode steps on GPUs by itself; on a CPU only when the config says so."""
    config = CompileConfig(**kwargs)
    config._compile_all_devices = True
    return config


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("windows", [(None, None), (5, 3)])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_static_generate_equals_four_cache_eager_and_compiled(make_model, left_padded, windows, kv_heads, fresh_dynamo):
    model = make_model(dtype=torch.float32, layer_types=HYBRID, w1=windows[0], w2=windows[1],
                       num_key_value_heads=kv_heads)
    ids, mask = left_padded([7, 4, 2])[1:]
    kw = dict(attention_mask=mask, max_new_tokens=9, do_sample=False, return_dict_in_generate=True)
    four = model.generate(ids, cache_implementation="four_cache", **kw).sequences
    eager = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(eager.sequences, four)
    cache = output_cache(eager)
    assert isinstance(cache.layers[0], StaticFourCacheLayer) and cache.max_cache_len == 7 + 9
    assert int(cache.get_seq_length()) == 7 + 9 - 1
    compiled = model.generate(ids, cache_implementation="static_four_cache",
                              compile_config=compile_config(fullgraph=True), **kw)
    assert torch.equal(compiled.sequences, four)
    assert hasattr(model, "_compiled_call")  # generate did compile its decode steps


def test_compiled_static_decode_step_is_one_graph_and_does_not_recompile(make_model, left_padded, fresh_dynamo):
    model = make_model(dtype=torch.float32, layer_types=HYBRID, w1=4)
    ids, mask = left_padded([6, 3])[1:]
    width = 12
    cache = TensorAttnCache(model.config, "static_four_cache", {"max_cache_len": width})
    full_mask = torch.nn.functional.pad(mask, (0, width - 6))
    with torch.no_grad():
        model(ids, attention_mask=full_mask, cache=cache)
        step = torch.randint(3, 259, (2, 1))
        full_mask[:, 6] = 1
        explained = torch._dynamo.explain(model)(step, attention_mask=full_mask.clone(), cache=cache)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        # The explain call appended a token; compiled steps continue from there, one graph for all of them.
        compiled = torch.compile(model, fullgraph=True)
        reference = TensorAttnCache(model.config, "four_cache")
        model(ids, attention_mask=mask, cache=reference)
        model(step, attention_mask=full_mask[:, :7], cache=reference)
        from torch._dynamo.utils import counters

        counters.clear()
        for t in range(7, 11):
            token = torch.randint(3, 259, (2, 1))
            full_mask[:, t] = 1
            got = compiled(token, attention_mask=full_mask.clone(), cache=cache).logits
            want = model(token, attention_mask=full_mask[:, : t + 1], cache=reference).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == 1  # the four steps share one compiled graph


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fullgraph_compile_of_a_plain_forward_with_each_default_layout(make_model, layout, fresh_dynamo):
    types = ["poly_tensor_attention", "tensor_attention"] if layout == "poly" else HYBRID
    model = make_model(dtype=torch.float32, layer_types=types, default_cache_implementation=layout,
                       max_position_embeddings=32)
    ids = torch.randint(3, 259, (2, 9))
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)(ids)
        eager = model(ids)
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-5, atol=1e-5)
    # Layouts that read counts on the host are not built unasked inside a graph; the others come back filled.
    built = output_cache(compiled)
    assert (built is None) == (not LAYOUTS[layout].traceable)
    if built is not None:
        assert int(built.get_seq_length()) == 9


def test_an_untraceable_cache_passed_to_a_fullgraph_compile_is_refused_by_name(make_model, fresh_dynamo):
    model = make_model(dtype=torch.float32, layer_types=HYBRID)
    with pytest.raises(Exception, match="two_cache.*cannot be filled inside a compiled graph"):
        torch.compile(model, fullgraph=True)(torch.randint(3, 259, (1, 5)),
                                             cache=TensorAttnCache(model.config, "two_cache"))


def test_static_layer_bookkeeping(make_model, left_padded):
    model = make_model(layer_types=HYBRID)
    ids, mask = left_padded([5, 3])[1:]
    cache = TensorAttnCache(model.config, "static_four_cache", {"max_cache_len": 8})
    model(ids, attention_mask=mask, cache=cache)  # a [B, tokens so far] mask is taken too
    layer = cache.layers[0]
    assert layer.keys.shape[2] == 8 and int(layer.length) == 5 and layer.seen == 5
    assert cache.memory_bytes() > 0 and layer.memory_bytes() == 2 * layer.keys.numel() * 8
    layer.crop(-2)
    assert layer.seen == 3
    with pytest.raises(ValueError, match="max_cache_len=8 tokens and has 3; 6 more do not fit"):
        model(torch.randint(3, 259, (2, 6)), cache=cache)
    with pytest.raises(ValueError, match=r"`max_cache_len` must be a positive int.*got 0"):
        StaticFourCacheLayer(TensorAttnConstants(scale=1.0), max_cache_len=0)
    with pytest.raises(ValueError, match=r"\[batch, max_cache_len\] = \(2, 8\) or \[batch, past \+ new tokens\]"):
        model(ids[:, :1], attention_mask=torch.ones(2, 5), cache=cache)  # neither 8 nor 3 + 1 wide


def test_static_generate_with_beams_and_a_nan_in_padding_equals_four_cache(make_model, left_padded):
    model = make_model(layer_types=HYBRID)
    ids, mask = left_padded([6, 3])[1:]
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, num_beams=2)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kw),
                       model.generate(ids, cache_implementation="four_cache", **kw))
    # A NaN state at a padded position is stored as 0 (`TensorAttnCache.attend`), at the position the static mask says
    # (tensor layers only: a standard layer's SDPA multiplies a padded NaN value by 0, with every cache).
    model = make_model(layer_types=["tensor_attention"] * 2)
    cache = TensorAttnCache(model.config, "static_four_cache", {"max_cache_len": 8})
    embeds = model.get_input_embeddings()(ids)
    embeds[1, 0] = float("nan")
    out = model(inputs_embeds=embeds, attention_mask=mask, cache=cache).logits
    assert out[mask.bool()].isfinite().all()


def test_static_generate_with_a_poly_layer_equals_four_cache(make_model, left_padded):
    # The poly layer's state is its own cache layer, which grows: it takes the mask of the tokens it holds, not the
    # static width (the cache is then not compileable, and generate decodes eagerly).
    model = make_model(layer_types=["poly_tensor_attention", *HYBRID], num_hidden_layers=3)
    ids, mask = left_padded([6, 3])[1:]
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kw),
                       model.generate(ids, cache_implementation="four_cache", **kw))
