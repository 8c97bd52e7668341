"""The attention door (`ops.dispatch`): it alone picks implementations, applies the autocast rule and checks the
Triton kernels at first use."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_tensor_attn
from hf_tensor_attn.ops import dispatch, naive_tensor_attention, tensor_attention
from tests.conftest import tiny_model

PACKAGE = Path(hf_tensor_attn.__file__).resolve().parent
ROOT = PACKAGE.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(), str(path))


def test_only_the_door_picks_an_implementation():
    """Outside ops/dispatch.py nothing reaches the Triton entry points or the C++ library, or looks at `.is_cuda` or
    the query length to pick a path (the kernels' own module reads `.is_cuda` for its launch constants)."""
    found = []
    for name, tree in _modules():
        if name == "ops/dispatch.py":
            continue
        for node in ast.walk(tree):
            # `from .exact import triton_kernels` as well as `from .exact.triton_kernels import forward`
            if isinstance(node, ast.ImportFrom) and "triton_kernels" in (
                    *(a.name for a in node.names), *(node.module or "").split(".")):
                found.append((name, node.lineno, "imports triton_kernels"))
            if isinstance(node, ast.Attribute) and node.attr in ("cpu_ops", "use_triton", "triton_kernels"):
                found.append((name, node.lineno, node.attr))
            if isinstance(node, ast.Name) and node.id in ("cpu_ops", "use_triton") and name != "ops/extension.py":
                found.append((name, node.lineno, node.id))
            if isinstance(node, ast.Attribute) and node.attr == "is_cuda" and name != "ops/exact/triton_kernels.py":
                found.append((name, node.lineno, "is_cuda"))
            if isinstance(node, ast.Compare) and "shape[2] == 1" in ast.unparse(node):
                found.append((name, node.lineno, ast.unparse(node)))
    assert not found, found


def test_the_config_is_the_ground_floor():
    tree = ast.parse((PACKAGE / "configuration.py").read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    assert not [m for m in imported if m.split(".")[0] in ("cache", "ops") or ".cache" in m or ".ops" in m], imported


def test_implementations_chosen_on_cpu(monkeypatch):
    q = torch.zeros(1, 1, 2, 8)
    compiled = "compiled" if dispatch.extension.cpu_ops() is not None else "python"
    assert dispatch.implementation(None, q, one_query=False, needs_grad=True) == compiled
    assert dispatch.implementation(None, q, one_query=True, needs_grad=False) == "decode"
    assert dispatch.implementation(None, q, one_query=True, needs_grad=True) == compiled
    monkeypatch.setenv("HF_TENSOR_ATTN_CPU_EXTENSION", "0")
    assert dispatch.implementation("torch", q, one_query=False, needs_grad=False) == "python"


# ---- mixed precision ----


def _inputs(dtype=torch.float32, B=2, H=4, H_kv=2, T=13, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    streams = [torch.randn(B, H_kv, T, D, generator=g, dtype=dtype) for _ in range(4)]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0
    return q, streams, mask


@pytest.mark.parametrize("one_query", [False, True])
def test_autocast_runs_the_op_in_the_autocast_dtype(one_query):
    """Mixed input dtypes, as a RoPE'd fp32 query meets bf16 projections under autocast: cast to bf16, fp32 inside."""
    q, streams, mask = _inputs()
    if one_query:
        q = q[:, :, -1:]
    mixed = [streams[0].bfloat16(), *streams[1:]]
    kw = dict(scale=0.4, w2=5, attention_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tensor_attention(q, *mixed, **kw)
    assert out.dtype == torch.bfloat16
    expected = naive_tensor_attention(q.bfloat16(), *(t.bfloat16() for t in streams), **kw)
    torch.testing.assert_close(out, expected, rtol=2**-7, atol=2**-7)
    with pytest.raises(ValueError, match="`k1` has dtype torch.bfloat16; all inputs must share q's dtype"):
        tensor_attention(q, *mixed, **kw)  # outside autocast mixed dtypes are an error


def test_hybrid_rope_model_under_bf16_autocast_matches_fp32():
    """Forward and backward of a RoPE model with tensor, standard and poly layers under CPU bf16 autocast, against
    the same model in fp32: logits and gradients within bf16's tolerance (relative to their scale)."""
    torch.manual_seed(0)
    model = tiny_model(torch.float32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       layer_types=["tensor_attention", "full_attention", "poly_tensor_attention"], w2=4).train()
    ids = torch.randint(3, 259, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    results = []
    for amp in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.float(), out.loss.item(), grads))
    (logits, loss, grads), (logits_amp, loss_amp, grads_amp) = results
    assert torch.isfinite(logits_amp).all() and abs(loss_amp - loss) < 0.05 * abs(loss)
    scale = logits.abs().max()
    assert (logits_amp - logits).abs().max() <= 0.05 * scale
    for name, g in grads.items():
        assert (grads_amp[name] - g).abs().max() <= 0.1 * g.abs().max() + 1e-6, name


def test_trainer_bf16_on_the_default_config_lowers_the_loss(tmp_path):
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    config = AutoConfig.for_model("tensor_attn", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  vocab_size=259, layer_types=["tensor_attention", "full_attention"])
    assert config.position_embedding_type == "rope"
    model = AutoModelForCausalLM.from_config(config)
    starts = torch.randint(3, 200, (64, 1))
    ids = (starts + torch.arange(12)).tolist()  # counting sequences: learnable from the previous token
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, max_steps=60, learning_rate=1e-2,
                             per_device_train_batch_size=8, logging_steps=10, report_to=[], save_strategy="no",
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert all(map(lambda x: x == x, losses)) and losses[-1] < 0.8 * losses[0], losses


# ---- the Triton kernels' self-check (interpreter, in a fresh process: see tests/ops/triton_cases.py) ----

SELF_CHECK = r"""
import warnings, torch
from hf_tensor_attn.ops import dispatch, tensor_attention, four_cache_decode
from hf_tensor_attn.ops.exact import triton_kernels
real_forward, real_decode = triton_kernels.forward, triton_kernels.four_cache_decode
calls = {"forward": 0, "decode": 0}
def wrong_forward(*args):
    calls["forward"] += 1
    out, lse = real_forward(*args)
    return out * 1.01, lse  # finite, plausible and wrong
def wrong_decode(*args, **kw):
    calls["decode"] += 1
    return real_decode(*args, **kw) + 0.01
triton_kernels.forward, triton_kernels.four_cache_decode = wrong_forward, wrong_decode
dispatch.use_triton = lambda backend, q: backend != "torch"  # CPU tensors count as CUDA ones: the interpreter runs
g = torch.Generator().manual_seed(3)
q, k1, k2, v1, v2 = (torch.randn(1, 2, 9, 16, generator=g) for _ in range(5))
kw = dict(scale=0.25, w1=4)
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    out = tensor_attention(q, k1, k2, v1, v2, **kw)
    again = tensor_attention(q, k1, k2, v1, v2, **kw)
    step = four_cache_decode(q[:, :, -1:], k1, k2, v1, v2, **kw)
messages = [str(w.message) for w in seen if "hf_tensor_attn: the Triton" in str(w.message)]
torch_out = tensor_attention(q, k1, k2, v1, v2, backend="torch", **kw)
torch_step = four_cache_decode(q[:, :, -1:], k1, k2, v1, v2, backend="torch", **kw)
assert len(messages) == 2, messages
assert "attention kernel (torch.float32, head dim 16, cpu) disagrees with the torch path: output" in messages[0], messages
assert "decode kernel" in messages[1], messages
assert torch.equal(out, torch_out) and torch.equal(again, torch_out) and torch.equal(step, torch_step)
assert calls == {"forward": 1, "decode": 1}, calls  # each wrong kernel ran in its check only
print("SELF-CHECK OK", sorted(dispatch.self_check_results().values()))
"""


def test_a_wrong_triton_kernel_is_caught_at_first_use_and_replaced_by_torch():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", SELF_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "SELF-CHECK OK" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]


def test_env_report_runs():
    run = subprocess.run([sys.executable, "-m", "hf_tensor_attn.env"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for line in ("torch: ", "transformers: ", "cpu capability (torch): ", "training (cpu, float32): ",
                 "decode step (cpu, float32): decode", "triton self-checks"):
        assert line in run.stdout, run.stdout


# ---- packed sequences ----


def _documents(lengths_per_row):
    return torch.tensor([[d for d, n in enumerate(lengths) for _ in range(n)] for lengths in lengths_per_row])


def _per_document_reference(op, q, streams, lengths_per_row, **kw):
    """Each document of each row alone through `op` (the queries are the last Tq positions), in order."""
    Tk, Tq = streams[0].shape[2], q.shape[2]
    rows = []
    for b, lengths in enumerate(lengths_per_row):
        pieces, start = [], 0
        for n in lengths:
            first = max(start, Tk - Tq)
            if first < start + n:
                pieces.append(op(q[b : b + 1, :, first - (Tk - Tq) : start + n - (Tk - Tq)],
                                 *(t[b : b + 1, :, start : start + n] for t in streams), **kw))
            start += n
        rows.append(torch.cat(pieces, 2))
    return torch.cat(rows, 0)


@pytest.mark.parametrize("loops", ["compiled", "python"])
@pytest.mark.parametrize("w1, w2", [(None, None), (3, None), (2, 5)])
def test_packed_documents_attend_within_themselves(loops, w1, w2, monkeypatch):
    """Documents at odd places and of length 1: outputs and all five gradients equal each document run alone by
    the naive op (float64)."""
    monkeypatch.setenv("HF_TENSOR_ATTN_CPU_EXTENSION", "1" if loops == "compiled" else "0")
    lengths = [[5, 1, 7], [1, 12]]
    q, streams, _ = _inputs(torch.float64, T=13)
    docs = _documents(lengths)
    kw = dict(scale=0.4, w1=w1, w2=w2)
    leaves = [t.clone().requires_grad_(True) for t in (q, *streams)]
    out = tensor_attention(*leaves, documents=docs, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, *streams)]
    ref = _per_document_reference(naive_tensor_attention, ref_leaves[0], ref_leaves[1:], lengths, **kw)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    # Pairs across documents do change the result: the test can see a leak.
    assert not torch.allclose(out, tensor_attention(q, *streams, **kw))


def test_packed_documents_for_queries_after_a_prefix_and_the_decode_step():
    lengths = [[4, 6, 3]]
    q, streams, _ = _inputs(torch.float64, B=1, T=13)
    docs = _documents(lengths)
    for Tq in (5, 1):
        out = tensor_attention(q[:, :, -Tq:], *streams, scale=0.3, documents=docs)
        ref = _per_document_reference(naive_tensor_attention, q[:, :, -Tq:], streams, lengths, scale=0.3)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_packed_documents_poly():
    from hf_tensor_attn.ops import naive_poly_tensor_attention, poly_tensor_attention

    lengths = [[3, 1, 5]]
    q, streams, _ = _inputs(torch.float64, B=1, H=2, H_kv=2, T=9)
    out = poly_tensor_attention(q, *streams, scale=0.3, degree=2, documents=_documents(lengths))
    ref = _per_document_reference(naive_poly_tensor_attention, q, streams, lengths, scale=0.3, degree=2)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_bad_documents_name_the_argument():
    q, streams, _ = _inputs()
    with pytest.raises(ValueError, match=r"`documents` must be a \[B, Tk\] = \(2, 13\) integer tensor"):
        tensor_attention(q, *streams, scale=0.3, documents=torch.zeros(2, 12, dtype=torch.long))
