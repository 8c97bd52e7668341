"""The extra keywords transformers passes to a causal LM's forward (compat.FORWARD_KWARGS): honoured, knowingly
ignored, or refused with a reason; anything else raises TypeError (test_transformers_api.py)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_tensor_attn import TensorAttnByteTokenizer

HYBRID = ["tensor_attention", "full_attention"]


def test_shift_labels_are_the_targets_when_given(make_model):
    """Sequence-parallel trainers pass targets already shifted; `labels` must then not move the loss."""
    model = make_model(layer_types=HYBRID)
    ids = torch.randint(3, 259, (2, 6))
    shift_labels = torch.randint(3, 259, (2, 6))
    shift_labels[0, -1] = -100
    out = model(ids, labels=ids, shift_labels=shift_labels)
    logits = out.logits.reshape(-1, 259).float()
    expected = torch.nn.functional.cross_entropy(logits, shift_labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss.double(), expected.double())
    other_labels = model(ids, labels=torch.randint(3, 259, (2, 6)), shift_labels=shift_labels).loss
    torch.testing.assert_close(other_labels, out.loss, rtol=0, atol=0)
    assert not torch.equal(model(ids, labels=ids).loss, out.loss)  # without them, labels shifted by one


def test_knowingly_ignored_keywords_change_nothing(make_model):
    model = make_model(layer_types=HYBRID)
    ids = torch.randint(3, 259, (2, 5))
    plain = model(ids).logits
    tok = TensorAttnByteTokenizer()
    for kwargs in (dict(tokenizer=tok), dict(assistant_tokenizer=tok), dict(output_router_logits=True),
                   dict(is_causal=True), dict(num_items_in_batch=torch.tensor(10))):
        torch.testing.assert_close(model(ids, **kwargs).logits, plain, rtol=0, atol=0)
        torch.testing.assert_close(model.model(ids, **kwargs).last_hidden_state, model.model(ids).last_hidden_state,
                                   rtol=0, atol=0)


def test_is_causal_false_is_refused(make_model):
    with pytest.raises(ValueError, match="is_causal=False"):
        make_model()(torch.randint(3, 259, (1, 4)), is_causal=False)


def _tiny_llama():
    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).double().eval()


@pytest.mark.parametrize("which", ["tensor_attn", "llama"])
def test_generate_stops_at_stop_strings_as_llama_does(make_model, which):
    """generate(stop_strings=..., tokenizer=...) ends right after the first occurrence of the stop string, for our
    model as for transformers' Llama (same tokenizer, same rule)."""
    model = make_model(layer_types=HYBRID, initializer_range=0.2) if which == "tensor_attn" else _tiny_llama()
    tok = TensorAttnByteTokenizer()
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    # A prompt whose greedy continuation has a letter or digit after its first two tokens: the stop string (other
    # bytes are single characters that transformers' stop-string matching may not map back to a token).
    for seed in range(50):
        ids = torch.randint(3, 259, (1, 5), generator=torch.Generator().manual_seed(seed))
        greedy = model.generate(ids, **kw)
        pieces = tok.convert_ids_to_tokens(greedy[0, 5:].tolist())
        found = [i for i in range(2, len(pieces)) if pieces[i].isascii() and pieces[i].isalnum()]
        if found:
            break
    stop = pieces[found[0]]
    cut = pieces.index(stop) + 1  # its first occurrence
    stopped = model.generate(ids, stop_strings=[stop], tokenizer=tok, **{**kw, "min_new_tokens": 0})
    assert torch.equal(stopped, greedy[:, : 5 + cut])
