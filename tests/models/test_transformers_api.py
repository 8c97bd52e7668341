"""The model as transformers calls it, on whichever supported transformers is installed: the cache keyword
(`cache` since 5.24, `past_key_values` before), keywords that must never be swallowed, quiet generation, and
loading a saved model with `trust_remote_code=True` in a process that never imported the package."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from transformers import DynamicCache

from hf_tensor_attn import TensorAttnCache, available_cache_implementations
from hf_tensor_attn.cache import LAYOUTS
from hf_tensor_attn.compat import CACHE_ARG, REMOTE_MODULE, output_cache

HYBRID = ["tensor_attention", "full_attention"]
INIT = 0.2  # large enough that a cache which forgets the past changes the greedy tokens (checked below)


def greedy_without_history(model, ids, mask, steps):
    """Greedy decoding where each step sees only the newest token: what a cache that is never read produces."""
    tokens = ids
    for _ in range(steps):
        logits = model(tokens[:, -1:], use_cache=False).logits[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
    return tokens


# "poly" replaces exp by a polynomial: it approximates these tokens (docs/bench_poly.md), it need not equal them.
@pytest.mark.parametrize("layout", [n for n in available_cache_implementations() if not LAYOUTS[n].changes_the_kernel])
def test_greedy_generate_each_layout_equals_no_cache_on_left_padded_batch(make_model, layout, left_padded):
    model = make_model(initializer_range=INIT, layer_types=HYBRID)
    ids, mask = left_padded([7, 4, 2])[1:]
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    ref = model.generate(ids, use_cache=False, **kw)
    out = model.generate(ids, cache_implementation=layout, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    cache = output_cache(out)
    assert isinstance(cache, TensorAttnCache) and cache.cache_implementation == layout
    assert cache.get_seq_length() == ids.shape[1] + 10 - 1  # every step went through this cache
    # The comparison can fail: decoding that ignores the past (the transformers 5.24 symptom) gives other tokens.
    assert not torch.equal(greedy_without_history(model, ids, mask, 10), ref.sequences)


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_forward_decodes_like_full_forward_with_either_cache_keyword(make_model, keyword, left_padded):
    model = make_model(layer_types=HYBRID)
    ids, mask = left_padded([7, 4, 2])[1:]
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache = TensorAttnCache(model.config)
    steps = [model(ids[:, :4], attention_mask=mask[:, :4], **{keyword: cache}).logits]
    for t in range(4, 7):
        steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **{keyword: cache}).logits)
    assert cache.get_seq_length() == 7
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-10, atol=1e-10)


def test_outputs_carry_the_cache_under_the_installed_name(make_model):
    model = make_model()
    out = model(torch.randint(3, 259, (1, 4)), use_cache=True)
    assert isinstance(getattr(out, CACHE_ARG), TensorAttnCache)
    assert out.to_tuple()[1] is getattr(out, CACHE_ARG)
    assert model(torch.randint(3, 259, (1, 4)), return_dict=False)[0].shape == (1, 4, 259)


@pytest.mark.parametrize("keyword", ["cache_position", "attn_mask", "past_key_value", "positions", "foo"])
def test_unknown_keyword_raises_type_error_naming_it(make_model, keyword):
    model = make_model()
    ids = torch.randint(3, 259, (1, 4))
    with pytest.raises(TypeError, match=keyword):
        model(ids, **{keyword: None})
    with pytest.raises(TypeError, match=keyword):
        model.model(ids, **{keyword: None})


def test_both_cache_keywords_at_once_raise(make_model):
    model = make_model()
    ids = torch.randint(3, 259, (1, 4))
    with pytest.raises(TypeError, match="both `cache` and `past_key_values`"):
        model(ids, cache=TensorAttnCache(model.config), past_key_values=TensorAttnCache(model.config))


def test_cache_object_together_with_cache_implementation_raises(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="both a cache object and cache_implementation"):
        model.generate(torch.randint(3, 259, (1, 4)), max_new_tokens=2, cache_implementation="two_cache",
                       **{CACHE_ARG: TensorAttnCache(model.config)})


def test_trainer_token_count_is_accepted_and_used(make_model):
    model = make_model()
    ids = torch.randint(3, 259, (2, 6))
    mean = model(ids, labels=ids).loss
    summed = model(ids, labels=ids, num_items_in_batch=torch.tensor(5)).loss
    torch.testing.assert_close(summed, mean * 10 / 5)  # 2 rows x 5 predicted tokens, summed, divided by 5


def test_a_cache_that_is_not_ours_is_refused_with_what_to_pass(make_model):
    model = make_model()
    with pytest.raises(TypeError, match="TensorAttnCache"):
        model(torch.randint(3, 259, (1, 4)), cache=DynamicCache())


def test_a_cache_built_for_another_model_is_refused(make_model):
    model = make_model()
    other = make_model(w1=3, w2=3)
    with pytest.raises(ValueError, match="built for"):
        model(torch.randint(3, 259, (1, 4)), cache=TensorAttnCache(other.config))


# ---- the attention interface (standard layers) ----


def test_eager_and_sdpa_standard_layers_agree_and_eager_returns_weights(make_model, tmp_path, left_padded):
    from transformers import AutoModelForCausalLM

    model = make_model(initializer_range=INIT, layer_types=HYBRID)
    model.save_pretrained(tmp_path)
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="eager").eval()
    sdpa = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="sdpa").eval()
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    ids, mask = left_padded([7, 4, 2])[1:]
    out_eager = eager(ids, attention_mask=mask, output_attentions=True)
    out_sdpa = sdpa(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(out_eager.logits[real], out_sdpa.logits[real], rtol=1e-10, atol=1e-10)
    real_queries = real[:, None, :].expand(3, 2, 7)
    # Tensor layers report the pair weights marginalised over the second key (eager_tensor_attention): the same
    # properties as a standard layer's weights.
    for weights in out_eager.attentions:
        assert weights.shape == (3, 2, 7, 7)
        rows = weights.sum(-1)[real_queries]
        torch.testing.assert_close(rows, torch.ones_like(rows))
        assert (weights.triu(1).sum(-1)[real_queries] == 0).all()  # causal for every real query
        assert (weights[2, :, -1, :5] == 0).all()  # the padded keys of the shortest row get no weight
    assert sdpa(ids, attention_mask=mask, output_attentions=True).attentions == (None, None)  # SDPA returns none
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(eager.generate(ids, **kw), sdpa.generate(ids, **kw))


def test_set_attn_implementation_switches_the_standard_layers(make_model, left_padded):
    """transformers' `set_attn_implementation` on a built model: eager then returns weights, flex computes the same."""
    model = make_model(layer_types=HYBRID, dtype=torch.float32)
    ids, mask = left_padded([7, 4, 2])[1:]
    with torch.no_grad():
        sdpa = model(ids, attention_mask=mask, output_attentions=True)
        assert sdpa.attentions == (None, None)
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        eager = model(ids, attention_mask=mask, output_attentions=True)
        assert all(w is not None and w.shape == (3, 2, 7, 7) for w in eager.attentions)
        model.set_attn_implementation("flex_attention")
        flex = model(ids, attention_mask=mask)
        assert model.config._attn_implementation == "flex_attention"
    real = mask.bool()
    for out in (eager, flex):
        torch.testing.assert_close(out.logits[real], sdpa.logits[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["flash_attention_2", "flash_attention_3", "paged|sdpa"])
def test_unsupported_attention_kernels_are_refused_at_load_naming_the_supported_ones(make_model, backend, tmp_path):
    from transformers import AutoModelForCausalLM

    make_model().save_pretrained(tmp_path)
    # transformers' wording first (its tests and users match it), then ours.
    with pytest.raises(ValueError, match=re.escape(f'Specified `attn_implementation="{backend}"` is not supported. ')
                       + r".*attn_implementation in \['sdpa', 'eager', 'flex_attention'\].*tensor layers"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=backend)


def test_flex_attention_standard_layers_equal_sdpa_with_padding(make_model, tmp_path, left_padded):
    """FlexAttention gets the causal + padding mask as a block mask. torch runs flex forward only on CPU, so this
    checks inference; its backward is torch's own (GPU)."""
    from transformers import AutoModelForCausalLM

    make_model(initializer_range=INIT, layer_types=HYBRID).save_pretrained(tmp_path)
    # float32: torch compiles flex for float32, float16 and bfloat16 on CPU, not float64.
    flex, sdpa = (AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation=backend).eval()
                  for backend in ("flex_attention", "sdpa"))
    assert flex.config._attn_implementation == "flex_attention"
    ids, mask = left_padded([7, 4, 2])[1:]
    with torch.no_grad():
        out_flex, out_sdpa = flex(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits
    real = mask.bool()
    # fp32: the two kernels sum in different orders; measured difference ~1e-7.
    torch.testing.assert_close(out_flex[real], out_sdpa[real], rtol=1e-5, atol=1e-5)


def test_generate_and_cached_forward_are_quiet(make_model, caplog, left_padded):
    """No deprecation warning or log line from our side, on either supported transformers."""
    model = make_model(layer_types=HYBRID)
    ids, mask = left_padded([7, 4, 2])[1:]
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        for layout in available_cache_implementations():
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, cache_implementation=layout)
        model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False)
        out = model(ids, attention_mask=mask, use_cache=True)
        model(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), cache=output_cache(out))
    assert not [r.getMessage() for r in caplog.records if "deprecat" in r.getMessage().lower()]


# ---- loading with trust_remote_code in a process that never imported hf_tensor_attn ----

REMOTE_SCRIPT = """
import json, sys
{block}
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
assert "hf_tensor_attn" not in sys.modules
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype="float64").eval()
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
batch = tok(json.loads(sys.argv[2]), return_tensors="pt", padding=True)
out = model.generate(**batch, max_new_tokens=8, do_sample=False)
gen = pipeline("text-generation", model=path, trust_remote_code=True)
text = gen("abc", max_new_tokens=4, do_sample=False)[0]["generated_text"]
model.save_pretrained(sys.argv[3])
print(json.dumps({{"tokens": out.tolist(), "tokenizer": type(tok).__name__, "text": text}}))
"""

BLOCK_PACKAGE = """
import importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_tensor_attn":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
"""


def run_fresh_python(script, *args, tmp_path):
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def saved_model(make_model, tmp_path):
    from hf_tensor_attn import TensorAttnByteTokenizer

    model = make_model(initializer_range=INIT, layer_types=HYBRID)
    path = tmp_path / "saved"
    model.save_pretrained(path)
    TensorAttnByteTokenizer().save_pretrained(path)
    return model, path


def test_save_writes_auto_map_and_loader_module(saved_model):
    _, path = saved_model
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == f"{REMOTE_MODULE}.TensorAttnForCausalLM"
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_config["auto_map"]["AutoTokenizer"][0] == f"{REMOTE_MODULE}.TensorAttnByteTokenizer"
    assert (path / f"{REMOTE_MODULE}.py").exists()


def test_trust_remote_code_loads_in_a_process_that_never_imported_the_package(saved_model, tmp_path):
    from hf_tensor_attn import TensorAttnByteTokenizer

    model, path = saved_model
    prompts = ["|adg", "hello wor", "x"]
    batch = TensorAttnByteTokenizer()(prompts, return_tensors="pt", padding=True)
    expected = model.generate(**batch, max_new_tokens=8, do_sample=False).tolist()
    resaved = tmp_path / "resaved"
    run = run_fresh_python(REMOTE_SCRIPT.format(block=""), str(path), json.dumps(prompts), str(resaved), tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["tokens"] == expected
    assert result["tokenizer"] == "TensorAttnByteTokenizerFast"  # auto_map names both; transformers 5 takes the fast
    assert result["text"].startswith("abc")
    # Saving the remotely loaded model writes the loader module again, never a copy of the package's sources.
    assert sorted(p.name for p in resaved.glob("*.py")) == [f"{REMOTE_MODULE}.py"]


def test_trust_remote_code_without_the_package_says_every_way_to_get_it(saved_model, tmp_path):
    _, path = saved_model
    script = REMOTE_SCRIPT.format(block=textwrap.dedent(BLOCK_PACKAGE))
    run = run_fresh_python(script, str(path), "[]", str(tmp_path / "unused"), tmp_path=tmp_path)
    assert run.returncode != 0
    ways = ("python -m build", "pip install dist/hf_tensor_attn-", "pip install git+", "pip install -e",
            "self_contained=True")
    assert "hf_tensor_attn" in run.stderr and all(way in run.stderr for way in ways), run.stderr[-3000:]


# ---- the layout as generation config ----


def test_generation_config_naming_a_layout_is_saved_restored_and_used(make_model, tmp_path, left_padded):
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = make_model(initializer_range=INIT, layer_types=HYBRID)
    ids, mask = left_padded([7, 4, 2])[1:]
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    model.generation_config.cache_implementation = "two_cache"
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert output_cache(out).cache_implementation == "two_cache" and torch.equal(out.sequences, ref)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["cache_implementation"] == "two_cache"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    out = loaded.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert output_cache(out).cache_implementation == "two_cache" and torch.equal(out.sequences, ref)
    # an explicit GenerationConfig naming a layout works too, and the call's own name wins over it
    config = GenerationConfig(cache_implementation="subgen4", max_new_tokens=6, do_sample=False)
    out = loaded.generate(ids, attention_mask=mask, generation_config=config, return_dict_in_generate=True)
    assert output_cache(out).cache_implementation == "subgen4" and torch.equal(out.sequences, ref)
    out = loaded.generate(ids, attention_mask=mask, generation_config=config, cache_implementation="four_cache",
                          return_dict_in_generate=True)
    assert output_cache(out).cache_implementation == "four_cache"


def test_generate_leaves_the_models_generation_config_alone_while_it_runs(make_model, left_padded):
    """Read at every step of a generate call (as another thread would): the model's layout name stays set."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model = make_model(initializer_range=INIT, layer_types=HYBRID)
    model.generation_config.cache_implementation = "two_cache"
    seen = []

    class Record(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(model.generation_config.cache_implementation)
            return scores

    ids, mask = left_padded([5, 3])[1:]
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                         logits_processor=LogitsProcessorList([Record()]))
    assert output_cache(out).cache_implementation == "two_cache" and seen == ["two_cache"] * 4


# ---- torch.compile ----


def test_compiled_model_forward_fullgraph_and_training_step_match_eager(make_model):
    model = make_model(dtype=torch.float32, layer_types=HYBRID, w1=5, w2=3)
    ids = torch.randint(3, 259, (2, 9))
    with torch.no_grad():  # inductor, the default backend, with the whole forward as one graph
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # left padding: compiled, the mask reaches every layer (no data-dependent branch)
        real = mask.bool()
        torch.testing.assert_close(compiled(ids, attention_mask=mask, use_cache=False).logits[real],
                                   model(ids, attention_mask=mask, use_cache=False).logits[real], rtol=1e-5, atol=1e-5)
    model.train()
    trained = torch.compile(model, fullgraph=True, backend="aot_eager")
    trained(ids, labels=ids).loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-7)


def test_inputs_longer_than_the_positions_warn_once(make_model, caplog):
    model = make_model(max_position_embeddings=8)
    with caplog.at_level(logging.WARNING):
        model(torch.randint(3, 259, (1, 6)), use_cache=False)
        assert not caplog.records
        model(torch.randint(3, 259, (1, 10)), use_cache=False)
        model(torch.randint(3, 259, (1, 12)), use_cache=False)
    warned = [r for r in caplog.records if "max_position_embeddings=8" in r.getMessage()]
    assert len(warned) == 1
