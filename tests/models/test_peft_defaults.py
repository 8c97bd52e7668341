"""PEFT LoRA without `target_modules` (compat item 12): the default targets are every projection of both attention
kinds, and the adapted model trains."""

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is in the dev extra; this checks the defaults it reads")

HYBRID = ["tensor_attention", "full_attention"]


def test_lora_without_target_modules_adapts_both_attention_kinds_and_trains(make_model):
    model = make_model(layer_types=HYBRID, dtype=torch.float32).train()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8))
    adapted = [name for name, _ in lora.named_parameters() if ".lora_A." in name]
    for layer in range(2):  # layer 0 is a tensor layer, layer 1 a standard one
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert any(f"layers.{layer}.self_attn.{proj}.lora_A." in name for name in adapted), (layer, proj)
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(3, 259, (2, 8))
    losses = []
    for _ in range(5):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
