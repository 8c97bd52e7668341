"""convert_from_llama: a converted Llama (Mistral, Qwen2) gives the source's logits and greedy tokens through every
cache layout, saves and reloads, trains fully and with LoRA, and refuses what it cannot convert exactly."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import hf_tensor_attn
from hf_tensor_attn import (
    TensorAttnByteTokenizer, TensorAttnByteTokenizerFast, TensorAttnForCausalLM, available_cache_implementations,
)
from hf_tensor_attn.cache import LAYOUTS
from hf_tensor_attn.compat import rope_frequencies
from hf_tensor_attn.convert import convert_from_llama
from scripts import convert_llama

SIZES = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
             max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}

SOURCES = {
    "llama-mha-tied-default": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=True), [1]),
    "llama-gqa-untied-linear": (LlamaForCausalLM, LlamaConfig, dict(
        num_key_value_heads=2, rope_parameters={"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0}), [0, 2]),
    "llama-gqa1-llama3-bias": (LlamaForCausalLM, LlamaConfig, dict(
        num_key_value_heads=1, head_dim=12, attention_bias=True, rope_parameters=LLAMA3), [-1]),
    "llama-gqa-yarn": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=2, rope_parameters=YARN), [1, 3]),
    "qwen2-gqa": (Qwen2ForCausalLM, Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True), [0]),
    "mistral-gqa": (MistralForCausalLM, MistralConfig, dict(num_key_value_heads=2, sliding_window=None), [2]),
}


def source_model(name):
    torch.manual_seed(0)
    model_class, config_class, extra, layers = SOURCES[name]
    model = model_class(config_class(**SIZES, **extra)).eval()
    with torch.no_grad():  # biases start at zero: make them count
        for param_name, p in model.named_parameters():
            if param_name.endswith("bias"):
                p.normal_(0, 0.5)
    return model, layers


@pytest.fixture(scope="module", params=list(SOURCES))
def converted(request):
    source, layers = source_model(request.param)
    return source, convert_from_llama(source, layers), layers


def test_logits_equal_the_source(converted):
    source, model, layers = converted
    assert [i for i, t in enumerate(model.config.layer_types) if t == "tensor_attention"] == sorted(
        i % SIZES["num_hidden_layers"] for i in layers)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, rtol=1e-5, atol=1e-5)


def test_greedy_tokens_equal_the_source_through_every_layout(converted):
    source, model, _ = converted
    ids = torch.randint(0, SIZES["vocab_size"], (2, 6))
    expected = source.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    for layout in [n for n in available_cache_implementations() if not LAYOUTS[n].changes_the_kernel]:
        # A short recent window makes SubGen summarise tokens during the decode: k2 = v2 = 1 keeps it exact even so.
        cache_config = {"recent_window": 4, "sink_tokens": 1} if layout.startswith("subgen") else None
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             cache_implementation=layout, cache_config=cache_config)
        assert torch.equal(out, expected), layout


def test_rope_tables_equal_llamas():
    """compat item 9: each RoPE type transformers' Llama supports and we allow gives Llama's exact tables."""
    for name in SOURCES:
        source, layers = source_model(name)
        model = convert_from_llama(source, layers)
        x, positions = torch.zeros(1), torch.arange(40)[None]
        llama_cos, llama_sin = source.model.rotary_emb(x, positions)
        cos, sin = model.model.rotary_emb(x, positions)
        torch.testing.assert_close(cos, llama_cos, rtol=0, atol=0)
        torch.testing.assert_close(sin, llama_sin, rtol=0, atol=0)
        inv_freq, scaling = rope_frequencies(model.config)
        assert torch.equal(inv_freq, source.model.rotary_emb.inv_freq) and scaling == source.model.rotary_emb.attention_scaling


def test_save_load_identical_logits_with_the_source_tokenizer(tmp_path):
    source, layers = source_model("llama-gqa-yarn")
    source.save_pretrained(tmp_path / "llama")
    TensorAttnByteTokenizer(model_max_length=64).save_pretrained(tmp_path / "llama")  # stands in for its tokenizer
    assert convert_llama.main([str(tmp_path / "llama"), str(tmp_path / "out"), "--tensor_layers", "1", "3"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(loaded, TensorAttnForCausalLM)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")  # the fast twin of the byte tokenizer, as saved
    assert isinstance(tokenizer, TensorAttnByteTokenizerFast) and tokenizer.model_max_length == 64
    in_memory = convert_from_llama(source, layers)
    ids = torch.randint(0, SIZES["vocab_size"], (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, in_memory(ids).logits)
        torch.testing.assert_close(loaded(ids).logits, source(ids).logits, rtol=1e-5, atol=1e-5)


def test_cli_help_and_refusal(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        convert_llama.main(["--help"])
    assert exit_info.value.code == 0 and "--tensor_layers" in capsys.readouterr().out
    source, _ = source_model("llama-mha-tied-default")
    source.save_pretrained(tmp_path)
    TensorAttnByteTokenizer(model_max_length=64).save_pretrained(tmp_path)  # a tokenizer is checked first
    assert convert_llama.main([str(tmp_path), str(tmp_path / "out"), "--tensor_layers", "9"]) == 2
    assert "tensor_layers" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _loss_drops(model, steps=15, lr=3e-3):
    torch.manual_seed(1)
    half = torch.randint(0, SIZES["vocab_size"], (4, 8))
    ids = torch.cat([half, half], 1)  # the second half repeats the first: attention can learn to copy
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_converted_model_trains_fully_and_k2_v2_move():
    source, layers = source_model("llama-gqa-untied-linear")
    model = convert_from_llama(source, layers)
    losses = _loss_drops(model)
    assert losses[-1] < losses[0] - 0.5
    attention = model.model.layers[layers[0]].self_attn
    k2_weight = attention.k_proj.weight.view(2, 2, 8, -1)[:, 1]  # [H_kv, k1|k2, D, hidden]: the k2 rows
    assert k2_weight.abs().max() > 0 and not torch.equal(attention.v2_bias, torch.ones_like(attention.v2_bias))


def test_converted_model_trains_with_lora_through_train_py_model_builder(tmp_path):
    from hf_tensor_attn.arguments import ModelArguments
    from hf_tensor_attn.training import build_model

    source, layers = source_model("llama-gqa-untied-linear")
    convert_from_llama(source, layers).save_pretrained(tmp_path)
    model = build_model(ModelArguments(init_from=str(tmp_path), lora_r=4), tokenizer=None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # k_proj's adapter spans both streams of every head, so k2 (and v2) can move under LoRA.
    assert any(f"layers.{layers[0]}.self_attn.k_proj.lora_B" in n for n in trainable)
    losses = _loss_drops(model, steps=20, lr=2e-2)
    assert losses[-1] < losses[0] - 0.2  # measured 4.07 -> 3.80: adapters on attention only, random base model


@pytest.mark.parametrize("make, match", [
    (lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30)),
     r"model_type in \['llama', 'mistral', 'qwen2'\]; got model_type='gpt2'"),
    (lambda: LlamaForCausalLM(LlamaConfig(**SIZES, rope_parameters={"rope_type": "dynamic", "factor": 2.0})),
     r"rope_type'\] is 'dynamic'; convertible types"),
    (lambda: MistralForCausalLM(MistralConfig(**SIZES, sliding_window=8)), "sliding_window"),
    (lambda: LlamaForCausalLM(LlamaConfig(**SIZES, mlp_bias=True)), "mlp_bias"),
])
def test_refuses_what_it_cannot_convert_exactly(make, match):
    with pytest.raises(ValueError, match=match):
        convert_from_llama(make(), [0])


@pytest.mark.parametrize("layers", [[], [4], [0, 0], ["1"]])
def test_refuses_bad_tensor_layers(layers):
    source, _ = source_model("llama-mha-tied-default")
    with pytest.raises(ValueError, match="tensor_layers"):
        convert_from_llama(source, layers)


@pytest.mark.parametrize("field, value", [("num_key_value_heads", 3), ("tensor_rope_streams", ["q", "v1"]),
                                          ("rope_parameters", {"rope_type": "longrope"})])
def test_new_config_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=field.replace("rope_parameters", "rope_type")):
        hf_tensor_attn.TensorAttnConfig(hidden_size=32, num_attention_heads=4, **{field: value})


def test_tensor_parallel_refuses_the_unsplit_kv2_biases():
    from types import SimpleNamespace

    source, layers = source_model("llama-gqa-untied-linear")
    model = convert_from_llama(source, layers)
    with pytest.raises(ValueError, match="tensor_kv2_bias"):
        type(model).maybe_distribute_model(model, SimpleNamespace(tp_size=2), mesh_manager=None)


def test_grouped_standard_layers_with_subgen_summaries_keep_the_source_tokens():
    """cache_config standard_layers='subgen' summarises the GQA standard layers too (delta=0: every key its own
    cluster, so exact): the greedy tokens stay the source's."""
    source, layers = source_model("llama-gqa-yarn")
    model = convert_from_llama(source, layers)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 6))
    expected = source.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                         cache_implementation="subgen4",
                         cache_config={"standard_layers": "subgen", "recent_window": 4, "sink_tokens": 1, "delta": 0.0})
    assert torch.equal(out, expected)


# Issue #35: conversion arguments that gave tracebacks.
def test_bad_arguments_are_refused_by_name(tmp_path):
    source, _ = source_model("llama-mha-tied-default")
    with pytest.raises(ValueError, match=r"`tensor_layers` must be a non-empty list .*got None"):
        convert_from_llama(source, None)
    with pytest.raises(ValueError, match=r"`config_overrides` must be a dict .*got \[1, 2\]"):
        convert_from_llama(source, [0], config_overrides=[1, 2])
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(ValueError, match=r"`model_or_path` '.*no_such_model' is no existing folder"):
        convert_from_llama(missing, [0])


def test_cli_refuses_bad_overrides_a_bad_path_and_a_source_without_tokenizer_before_converting(capsys, tmp_path):
    """`--config_overrides '[1,2]'` and a bad local path were tracebacks; a source without a tokenizer was converted,
    then the tokenizer failed and nothing was saved."""
    source, _ = source_model("llama-mha-tied-default")
    source.save_pretrained(tmp_path / "llama")
    out = tmp_path / "out"
    assert convert_llama.main([str(tmp_path / "nope"), str(out), "--tensor_layers", "1"]) == 2
    assert "`source` " in capsys.readouterr().err
    assert convert_llama.main([str(tmp_path / "llama"), str(out), "--tensor_layers", "1"]) == 2
    assert re.search(r"no tokenizer loads from .*; pass --tokenizer NAME_OR_PATH", capsys.readouterr().err, re.S)
    TensorAttnByteTokenizer(model_max_length=64).save_pretrained(tmp_path / "llama")
    assert convert_llama.main([str(tmp_path / "llama"), str(out), "--tensor_layers", "1",
                               "--config_overrides", "[1, 2]"]) == 2
    assert "`config_overrides` must be a dict" in capsys.readouterr().err
    assert not out.exists()
