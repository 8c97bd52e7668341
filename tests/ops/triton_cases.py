"""The cases of tests/ops/test_triton.py, run by that test in a subprocess with TRITON_INTERPRET=1.

Triton's interpreter must be on before `triton` is first imported (its own library functions are decorated at
import, and torch imports triton early once it is installed), so the kernels run in a fresh interpreter process:
`python -m tests.ops.triton_cases OUT.pt` computes every case with the kernels and with
`naive_tensor_attention` and saves both; the test compares them. The rest of the suite never sees interpreted
kernels.

The interpreter executes every tile operation in numpy (tens of ms each), so the cases cover each condition once
rather than their cross product: causal, windows w1 = w2 = 1, windows >= T, left padding (including queries with
no allowed pair), Tq < Tk, T in {1, 17, 20, 70}, D in {16, 64, 96, 128} (so every tile shape of `TILES` runs),
bf16, fp16 and fp32, grouped key/value heads (H given as (H, H_kv)); and NaN containment on a few cases.

On a GPU the same cases run compiled: `python -m tests.ops.triton_cases OUT.pt --device cuda` without
TRITON_INTERPRET, which test_triton.py does when TRITON_CASES_DEVICE=cuda (scripts/bench/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
import traceback
from unittest import mock

import torch

# (B, H or (H, H_kv), Tq, Tk, D, w1, w2, left pads per row or None, dtype)
ATTENTION_CASES = {
    "causal-T17-D16": (1, 2, 17, 17, 16, None, None, None, torch.float32),
    "windows-1x1": (1, 1, 17, 17, 16, 1, 1, None, torch.float32),
    "windows>=T": (1, 1, 17, 17, 16, 17, 40, None, torch.float32),
    "padding-windows-Tq<Tk": (2, 1, 17, 20, 16, 5, 3, (4, 0), torch.float32),
    "T70-D64-windows-padding": (2, 1, 70, 70, 64, 13, 6, (0, 9), torch.float32),
    "Tq1-Tk70-causal-padding": (2, 1, 1, 70, 16, None, None, (7, 0), torch.float32),
    "T1-D64": (1, 2, 1, 1, 64, None, None, None, torch.float32),
    "bf16-causal-D64": (1, 1, 17, 17, 64, None, 4, None, torch.bfloat16),
    "bf16-T70-windows-padding": (2, 1, 70, 70, 64, 13, 40, (0, 9), torch.bfloat16),
    "fp16-T70-causal-padding": (2, 1, 70, 70, 64, None, 6, (5, 0), torch.float16),
    "bf16-D128-windows-padding": (1, 1, 20, 20, 128, 6, 5, (3,), torch.bfloat16),
    "D96-causal-padding": (1, 1, 20, 20, 96, None, None, (2,), torch.float32),
    "grouped-H4-Hkv2-windows-padding": (2, (4, 2), 17, 20, 16, 5, 3, (4, 0), torch.float32),
    "grouped-H2-Hkv1-causal": (1, (2, 1), 17, 17, 16, None, None, None, torch.float32),
}

# (B, H or (H, H_kv), Tk, D, w1, w2, left pads or None, dtype)
DECODE_CASES = {
    "Tk1": (1, 2, 1, 16, None, None, None, torch.float32),
    "Tk17-windows-padding": (2, 2, 17, 16, 5, 3, (3, 0), torch.float32),
    "Tk70-D64-causal-padding": (2, 1, 70, 64, None, None, (0, 11), torch.float32),
    "Tk70-windows-1x1": (1, 1, 70, 16, 1, 1, None, torch.float32),
    "all-padding": (1, 1, 17, 16, 4, None, (17,), torch.float32),
    "bf16-windows>=T": (1, 2, 70, 64, 80, 70, None, torch.bfloat16),
    "fp16-D128-window-padding": (2, 1, 70, 128, None, 20, (4, 0), torch.float16),
    "D96-windows-padding": (2, 1, 70, 96, 30, 9, (0, 6), torch.float32),
    "grouped-H4-Hkv1-window-padding": (2, (4, 1), 17, 16, None, 4, (3, 0), torch.float32),
}


# NaN containment (tests/ops/test_nonfinite.py): (input, key position, value, windows, masked); fp32 copies of that
# file's inputs. A later key, a padded value, a query, a value inside a window.
NONFINITE_CASES = {
    "later-k2-nan": ("k2", 10, float("nan"), (None, None), False),
    "padded-v2-nan": ("v2", 1, float("nan"), (None, None), True),
    "q-nan": ("q", 7, float("nan"), (None, None), False),
    "window-v2-inf": ("v2", 5, float("inf"), (None, 4), True),
}


DEVICE = torch.device("cpu")  # --device: where the kernels run (inputs are drawn on CPU, then moved)


def left_pad_mask(B, Tk, pads):
    mask = torch.ones(B, Tk, dtype=torch.bool)
    for row, pad in enumerate(pads):
        mask[row, :pad] = False
    return mask.to(DEVICE)


def on_device(tensors):
    return [t.to(DEVICE) for t in tensors]


def query_heads(heads) -> int:
    return heads if isinstance(heads, int) else heads[0]


def grouped(inputs, heads):
    """The inputs with k1, k2, v1, v2 cut to their first H_kv heads when heads is (H, H_kv)."""
    if isinstance(heads, int):
        return inputs
    q, *streams = inputs
    return [q, *(t[:, : heads[1]].contiguous() for t in streams)]


def in_place_heads(heads):
    """With grouped heads, a context in which repeating them (`repeat_kv`) fails: the kernels read them in place."""
    if isinstance(heads, int):
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch("hf_tensor_attn.ops.dispatch.repeat_kv",
                                   side_effect=AssertionError("repeated for the kernel")))
    return stack


def _attention(case):
    from hf_tensor_attn.ops import naive_tensor_attention, tensor_attention
    from tests.ops.test_tiled import make_inputs, outputs_and_grads

    B, heads, Tq, Tk, D, w1, w2, pads, dtype = ATTENTION_CASES[case]
    inputs, dout = make_inputs(B, query_heads(heads), Tq, Tk, D, dtype, seed=len(case))
    inputs, dout = grouped(on_device(inputs), heads), dout.to(DEVICE)
    kw = dict(scale=D**-0.5, w1=w1, w2=w2, attention_mask=None if pads is None else left_pad_mask(B, Tk, pads))
    with in_place_heads(heads):
        actual = outputs_and_grads(tensor_attention, inputs, dout, backend="triton", **kw)
    return actual, outputs_and_grads(naive_tensor_attention, inputs, dout, **kw)


def _decode(case):
    from hf_tensor_attn.ops import four_cache_decode, naive_tensor_attention
    from hf_tensor_attn.ops.exact import triton_kernels
    from tests.ops.test_tiled import make_inputs

    B, heads, Tk, D, w1, w2, pads, dtype = DECODE_CASES[case]
    inputs, _ = make_inputs(B, query_heads(heads), 1, Tk, D, dtype, seed=len(case))
    q, k1, k2, v1, v2 = grouped(on_device(inputs), heads)
    kw = dict(scale=D**-0.5, w1=w1, w2=w2, attention_mask=None if pads is None else left_pad_mask(B, Tk, pads))
    with torch.no_grad(), in_place_heads(heads):
        dispatched = four_cache_decode(q, k1, k2, v1, v2, backend="triton", **kw)
        direct = triton_kernels.four_cache_decode(q, k1, k2, v1, v2, **kw)
    return [dispatched, direct], [naive_tensor_attention(q, k1, k2, v1, v2, **kw)]


def _nonfinite(case):
    """The poisoned call's output (prefill and the last position's decode step) with the kernels, against naive."""
    from hf_tensor_attn.ops import four_cache_decode, naive_tensor_attention, tensor_attention
    from tests.ops.test_nonfinite import inputs, poison

    name, position, value, (w1, w2), masked = NONFINITE_CASES[case]
    tensors, mask = inputs()
    q, *streams = on_device(poison([t.float() for t in tensors], name, position, value))
    kw = dict(scale=0.5, w1=w1, w2=w2, attention_mask=mask.to(DEVICE) if masked else None)
    with torch.no_grad():
        actual = [tensor_attention(q, *streams, backend="triton", **kw),
                  four_cache_decode(q[:, :, -1:], *streams, backend="triton", **kw)]
    expected = [naive_tensor_attention(q.double(), *(t.double() for t in streams), **kw)]
    return actual, [expected[0], expected[0][:, :, -1:]]


def _autocast_fp16(_):
    """fp32 inputs under fp16 autocast with the kernels: the door runs them in fp16, as SDPA would; the naive op
    gets the fp16-rounded inputs in float64 (the exact result for what the kernels were given)."""
    from hf_tensor_attn.ops import naive_tensor_attention, tensor_attention
    from tests.ops.test_tiled import make_inputs, outputs_and_grads

    inputs, dout = make_inputs(2, 2, 17, 17, 16, torch.float32, seed=5)
    inputs, dout = on_device(inputs), dout.to(DEVICE).half()
    # No padding: the fp16 case of ATTENTION_CASES covers it; here the autocast rule is under test.
    kw = dict(scale=0.25, w2=6)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        actual = outputs_and_grads(tensor_attention, inputs, dout, backend="triton", **kw)
    return actual, outputs_and_grads(naive_tensor_attention, [t.half().double() for t in inputs], dout.double(), **kw)


def _packed(_):
    """Packed documents (one of length 1, boundaries at odd places) with the kernels, outputs and gradients,
    against each document alone through the naive op."""
    from hf_tensor_attn.ops import naive_tensor_attention, tensor_attention
    from tests.ops.test_dispatch import _documents, _per_document_reference
    from tests.ops.test_tiled import make_inputs, outputs_and_grads

    lengths = [[6, 1, 10], [11, 6]]
    inputs, dout = make_inputs(2, 2, 17, 17, 16, torch.float32, seed=7)
    inputs, dout = on_device(inputs), dout.to(DEVICE)
    kw = dict(scale=0.25, w1=5)
    actual = outputs_and_grads(tensor_attention, inputs, dout, backend="triton", documents=_documents(lengths), **kw)

    def reference(q, *streams, **kw):
        return _per_document_reference(naive_tensor_attention, q, streams, lengths, **kw)

    return actual, outputs_and_grads(reference, inputs, dout, **kw)


def _model_logits(backend):
    """Greedy logits of a 1-layer model: prefill (tiled op) and two decode steps (four-cache layer)."""
    from tests.conftest import tiny_model

    ids = torch.randint(3, 259, (1, 6), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)  # the same weights for both backends
    model = tiny_model(torch.float32, num_hidden_layers=1, tensor_attention_backend=backend, w2=4).to(DEVICE)
    out = model.generate(ids.to(DEVICE), max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits)


def run_all(shard: int = 0, shards: int = 1) -> dict:
    """Every case (or every `shards`-th from `shard` on: the test runs one process per core)."""
    results = {}
    jobs = [(f"attention/{c}", _attention, c) for c in ATTENTION_CASES]
    jobs += [(f"decode/{c}", _decode, c) for c in DECODE_CASES]
    jobs += [(f"nonfinite/{c}", _nonfinite, c) for c in NONFINITE_CASES]
    jobs += [("autocast/fp16", _autocast_fp16, None), ("packed/documents", _packed, None)]
    jobs += [("model/generate", lambda _: ([_model_logits("triton")], [_model_logits("torch")]), None)]
    for name, fn, case in jobs[shard::shards]:
        try:
            actual, expected = fn(case)
            results[name] = {"actual": actual, "expected": expected}
        except Exception:  # reported by the test of this case, the other cases still run
            results[name] = {"error": traceback.format_exc()}
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args()
    DEVICE = torch.device(args.device)
    torch.set_num_threads(1)  # tiny tiles: a second thread only adds barriers
    torch.save(run_all(args.shard, args.shards), args.out)
