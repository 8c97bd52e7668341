"""Packed sequences (issue 32): documents side by side in one row, as transformers' flattening collator and TRL's
`packing=True` give them, attend within their own document in every layer kind, so each document's logits and loss
are those it has alone."""

from __future__ import annotations

import pytest
import torch

from hf_tensor_attn import compat
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = [5, 1, 9, 2]  # boundaries at odd places and a document of one token


def _model(**overrides):
    torch.manual_seed(0)
    kw = dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, w1=3,
              layer_types=["tensor_attention", "full_attention", "poly_tensor_attention"])
    kw.update(overrides)
    return tiny_model(torch.float64, **kw)


def _documents():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 259, (n,), generator=g) for n in LENGTHS]


def _alone(model, docs):
    with torch.no_grad():
        return torch.cat([model(doc[None], use_cache=False).logits[0] for doc in docs])


@pytest.mark.parametrize("loops", ["compiled", "python"])
@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens", "seq_idx"])
def test_each_packed_document_gets_its_logits_alone(how, loops, monkeypatch):
    monkeypatch.setenv("HF_TENSOR_ATTN_CPU_EXTENSION", "1" if loops == "compiled" else "0")
    model, docs = _model(), _documents()
    ids = torch.cat(docs)[None]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    kwargs = {
        "position_ids": dict(position_ids=torch.cat([torch.arange(n) for n in LENGTHS])[None]),
        "cu_seq_lens_q": None,
        "cu_seq_lens": dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS)),
        "seq_idx": dict(seq_idx=torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])[None]),
    }[how]
    with torch.no_grad():
        packed = model(ids, **kwargs).logits[0]
    torch.testing.assert_close(packed, _alone(model, docs), rtol=1e-9, atol=1e-9)
    # the same row unpacked does differ: a leak across documents would be seen
    with torch.no_grad():
        assert not torch.allclose(model(ids, use_cache=False).logits[0], packed)


def test_packed_loss_and_gradients_equal_the_documents_alone():
    model, docs = _model(), _documents()
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    labels = ids.clone()
    starts = torch.tensor(LENGTHS).cumsum(0)[:-1]
    labels[0, starts] = -100  # the first token of a document is not predicted from the previous document
    model.train()
    packed = model(ids, position_ids=positions, labels=labels).loss
    grads = torch.autograd.grad(packed, list(model.parameters()))
    total = sum(model(doc[None], labels=doc[None]).loss * (len(doc) - 1) for doc in docs if len(doc) > 1)
    alone = total / sum(len(doc) - 1 for doc in docs)
    alone_grads = torch.autograd.grad(alone, list(model.parameters()))
    # transformers' causal-LM loss upcasts the logits to float32 (the logits themselves agree to 1e-9 above)
    torch.testing.assert_close(packed, alone, rtol=1e-6, atol=1e-6)
    for g, a in zip(grads, alone_grads):
        torch.testing.assert_close(g, a, rtol=1e-5, atol=1e-6)


def test_a_packed_batch_refuses_a_cache_and_eval_builds_none():
    model, docs = _model(), _documents()
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    with pytest.raises(ValueError, match="packed batch .* cannot use a cache"):
        model(ids, position_ids=positions, use_cache=True)
    assert compat.output_cache(model(ids, position_ids=positions)) is None  # eval mode's default cache is left out
    with pytest.raises(ValueError, match="cu_seq_lens_q` must be the cumulative document lengths"):
        model(ids, cu_seq_lens_q=torch.tensor([0, 3, 5]))


def test_trl_sft_trainer_with_packing_trains_within_documents(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from hf_tensor_attn import TensorAttnByteTokenizer

    tok = TensorAttnByteTokenizer(add_eos_token=True)
    model = _model(vocab_size=259).float().train()
    text = ["abcabcabc", "hello world", "x", "tensor attention attends to pairs", "the end"] * 8
    seen = []
    real = compat.packed_documents

    def spy(kwargs, position_ids, attention_mask, shape):
        documents = real(kwargs, position_ids, attention_mask, shape)
        seen.append(0 if documents is None else int(documents.max()) + 1)  # documents in the row
        return documents

    compat.packed_documents = spy
    try:
        config = trl.SFTConfig(output_dir=str(tmp_path), packing=True, max_length=64, per_device_train_batch_size=2,
                               max_steps=6, learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                               use_cpu=True, bf16=True, dataset_num_proc=None)
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": text}),
                                 processing_class=tok)
        trainer.train()
    finally:
        compat.packed_documents = real
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(x == x for x in losses), losses
    # Every step's rows reached the model as several documents, told apart.
    assert len(seen) == 6 and min(seen) > 1, seen
