"""The default chat template's {% generation %} markers: assistant token masks (compat item 13) and TRL's
`assistant_only_loss`."""

import pytest
import torch

from hf_tensor_attn import TensorAttnByteTokenizer

CHAT = [
    {"role": "user", "content": "hi é"},
    {"role": "assistant", "content": "yo ü"},
    {"role": "user", "content": "x"},
    {"role": "assistant", "content": "z"},
]


def _masked(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_template_renders_as_before_the_markers():
    tok = TensorAttnByteTokenizer()
    assert tok.apply_chat_template(CHAT, tokenize=False) == (
        "<s>user: hi é</s>\n<s>assistant: yo ü</s>\n<s>user: x</s>\n<s>assistant: z</s>\n"
    )
    assert tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True) == (
        "<s>user: hi é</s>\n<s>assistant: "
    )


def test_assistant_mask_covers_each_reply_and_its_end_token():
    tok = TensorAttnByteTokenizer()
    out = tok.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == tok.apply_chat_template(CHAT, return_dict=True)["input_ids"]  # same tokens as unmasked
    assert _masked(tok, out["input_ids"], out["assistant_masks"]) == "yo ü</s>z</s>"
    assert out.encodings is None  # the offsets lent to transformers for the call are gone
    assert not tok(["ab"]).encodings


def test_assistant_mask_with_left_padding_and_truncation():
    tok = TensorAttnByteTokenizer()
    out = tok.apply_chat_template([CHAT, CHAT[:2]], return_dict=True, return_assistant_tokens_mask=True,
                                  padding=True, return_tensors="pt")
    assert out["assistant_masks"].shape == out["input_ids"].shape
    replies = [_masked(tok, ids.tolist(), mask.tolist()) for ids, mask in zip(out["input_ids"], out["assistant_masks"])]
    assert replies == ["yo ü</s>z</s>", "yo ü</s>"]
    assert not out["assistant_masks"][1][~out["attention_mask"][1].bool()].any()  # padding is never a reply
    cut = tok.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True, truncation=True,
                                  max_length=29)
    assert len(cut["input_ids"]) == 29
    assert _masked(tok, cut["input_ids"], cut["assistant_masks"]) == "yo "  # the reply's tokens that were kept


def test_trl_trains_on_assistant_tokens_only(make_model, tmp_path):
    trl = pytest.importorskip("trl", reason="trl is in the dev extra; this checks assistant_only_loss with it")
    from datasets import Dataset

    model = make_model(dtype=torch.float32, layer_types=["tensor_attention", "full_attention"])
    tok = TensorAttnByteTokenizer()
    data = Dataset.from_list([{"messages": CHAT}, {"messages": CHAT[:2]}] * 2)
    args = trl.SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_steps=2, per_device_train_batch_size=2,
                         bf16=False, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        kept = ids[labels != -100].tolist()
        assert tok.decode(kept) in ("yo ü</s>z</s>", "yo ü</s>")
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
