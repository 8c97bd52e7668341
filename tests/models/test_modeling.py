"""Model-level checks every causal LM needs: cache decode = full forward, padding, generate, save/load."""

import re

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import hf_tensor_attn
from hf_tensor_attn import TensorAttnCache, TensorAttnForCausalLM, TensorAttnModel
from hf_tensor_attn.compat import output_cache

CONFIGS = {
    "tensor": {},
    "hybrid": {"layer_types": ["tensor_attention", "full_attention"]},
    "windowed": {"w1": 4, "w2": 3},
    "nope": {"position_embedding_type": "none", "score_scale": 0.5},
}


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_then_decode_matches_full_forward(make_model, name):
    model = make_model(**CONFIGS[name])
    ids = torch.randint(3, 259, (2, 13))
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :5], use_cache=True)
    cache, steps = output_cache(out), [out.logits]
    assert isinstance(cache, TensorAttnCache)
    steps.append(model(ids[:, 5:8], cache=cache).logits)  # chunked prefill continuation, Tq < Tk
    for t in range(8, 13):
        steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert cache.get_seq_length() == 13
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["tensor", "hybrid", "windowed"])
def test_greedy_generate_with_cache_equals_without(make_model, name):
    model = make_model(**CONFIGS[name])
    ids = torch.randint(3, 259, (2, 6))
    kw = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_scores=True)
    cached = model.generate(ids, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["tensor", "hybrid", "windowed"])
def test_left_padded_batch_matches_each_row_alone(make_model, name):
    model = make_model(**CONFIGS[name])
    rows = [torch.randint(3, 259, (n,)) for n in (7, 4, 1)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    kw = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    batched = model.generate(ids, attention_mask=mask, **kw)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], **kw)
        assert torch.equal(batched.sequences[i, width:], alone.sequences[0, len(r) :])
        for s_b, s_a in zip(batched.scores, alone.scores):
            torch.testing.assert_close(s_b[i], s_a[0], rtol=1e-9, atol=1e-9)
    # the forward logits of the real positions agree too
    logits = model(ids, attention_mask=mask, use_cache=False).logits
    for i, r in enumerate(rows):
        alone = model(r[None], use_cache=False).logits[0]
        torch.testing.assert_close(logits[i, width - len(r) :], alone, rtol=1e-10, atol=1e-10)


def test_sampling_and_beam_search_run(make_model):
    model = make_model(layer_types=["tensor_attention", "full_attention"])
    ids = torch.randint(3, 259, (2, 5))
    torch.manual_seed(1)
    a = model.generate(ids, do_sample=True, top_k=20, max_new_tokens=7)
    torch.manual_seed(1)
    b = model.generate(ids, do_sample=True, top_k=20, max_new_tokens=7)
    assert torch.equal(a, b) and a.shape == (2, 12)
    beams = model.generate(ids, num_beams=3, num_return_sequences=2, do_sample=False, max_new_tokens=5)
    assert beams.shape == (4, 10)


def test_labels_give_shifted_cross_entropy(make_model):
    model = make_model()
    ids = torch.randint(3, 259, (2, 9))
    out = model(ids, labels=ids)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().reshape(-1, 259), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    assert model(ids, logits_to_keep=1).logits.shape == (2, 1, 259)


def test_gradient_checkpointing_gives_same_gradients(make_model):
    model = make_model(layer_types=["tensor_attention", "full_attention"]).train()
    ids = torch.randint(3, 259, (2, 8))
    model(ids, labels=ids).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for g, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_bf16_forward_and_backward_are_finite(make_model):
    model = make_model(dtype=torch.bfloat16).train()
    ids = torch.randint(3, 259, (2, 8))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["tensor", "hybrid", "windowed"])
def test_bf16_logits_match_float32_within_one_ulp_of_the_largest(make_model, name):
    """A bf16 model against the float32 model with the same (bf16-rounded) weights. Bound: one bf16 ulp of the
    largest logit, 2^-7 relative; measured 2.6e-3 to 3.8e-3 relative on these models (2 layers, width 32)."""
    model = make_model(dtype=torch.float32, **CONFIGS[name])
    rounded = {key: value.to(torch.bfloat16) for key, value in model.state_dict().items()}
    model.load_state_dict({key: value.float() for key, value in rounded.items()})
    half = make_model(dtype=torch.bfloat16, **CONFIGS[name])
    half.load_state_dict(rounded)
    ids = torch.randint(3, 259, (2, 12))
    with torch.no_grad():
        expected, actual = model(ids).logits, half(ids).logits
    assert actual.dtype == torch.bfloat16
    bound = 2**-7 * expected.abs().max().item()
    assert (actual.float() - expected).abs().max().item() <= bound


def test_save_and_reload_through_auto_classes(tmp_path, make_model):
    model = make_model(dtype=torch.float32, layer_types=["tensor_attention", "full_attention"], w1=5)
    tok = hf_tensor_attn.TensorAttnByteTokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, TensorAttnForCausalLM)
    assert loaded.config.layer_types == model.config.layer_types and loaded.config.w1 == 5
    ids = tok(["3 14 22 ", "hello"], padding=True, return_tensors="pt")
    torch.testing.assert_close(loaded(**ids).logits, model(**ids).logits, rtol=0, atol=0)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert type(tok2) is hf_tensor_attn.TensorAttnByteTokenizerFast  # transformers 5 loads the fast one first
    assert tok2(["3 14 22 ", "hello"], padding=True).input_ids == tok(["3 14 22 ", "hello"], padding=True).input_ids
    text = "tensor attention ü 3 14"
    assert tok2.decode(tok2(text).input_ids) == text
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, TensorAttnModel)


def test_tied_embeddings_share_storage(make_model):
    model = make_model()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = make_model(tie_word_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_bad_forward_inputs_raise(make_model):
    model = make_model()
    ids = torch.randint(3, 259, (2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="input_ids"):
        model()


def test_unknown_cache_implementation_lists_valid_names(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="four_cache"):
        model.generate(torch.randint(3, 259, (1, 4)), cache_implementation="nonsense", max_new_tokens=2)


def test_hidden_states_and_pipeline(make_model):
    from transformers import pipeline

    model = make_model(dtype=torch.float32)
    ids = torch.randint(3, 259, (1, 6))
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    generator = pipeline("text-generation", model=model, tokenizer=hf_tensor_attn.TensorAttnByteTokenizer())
    texts = generator(["|ac", "|bzx"], max_new_tokens=5, do_sample=False, batch_size=2)
    assert len(texts) == 2 and texts[0][0]["generated_text"].startswith("|ac")


# Issue #35: inputs that failed inside the model with a bare shape error.
@pytest.mark.parametrize("shape", [(1, 0), (0, 3)])
def test_empty_input_ids_are_refused_by_name(make_model, shape):
    model = make_model(layer_types=["tensor_attention", "poly_tensor_attention"])
    ids = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"`input_ids` must hold at least one token .*got shape {re.escape(str(shape))}"):
        model(ids)
    if shape[0]:
        with pytest.raises(ValueError, match=r"`input_ids` must hold at least one token"):
            model.generate(ids, max_new_tokens=2)


def test_attention_mask_of_another_length_is_refused_by_generate(make_model):
    """A too-short mask failed in apply_rotary ("The size of tensor a (4) must match the size of tensor b (2)")."""
    model = make_model()
    with pytest.raises(ValueError, match=r"`attention_mask` must have the shape of `input_ids` \(1, 4\) .*got \(1, 2\)"):
        model.generate(torch.tensor([[3, 4, 5, 6]]), attention_mask=torch.ones(1, 2, dtype=torch.long),
                       max_new_tokens=2)
    with pytest.raises(ValueError, match=r"`position_ids` must hold one position per new token, \[batch, 4\]"):
        model(torch.tensor([[3, 4, 5, 6]]), position_ids=torch.arange(2)[None])
