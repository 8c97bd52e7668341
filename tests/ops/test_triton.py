"""The Triton kernels (`ops.triton_kernels`) against `naive_tensor_attention`: forward, all five gradients and the
four-cache decode step, on CPU tensors in Triton's interpreter. The cases and why they run in a subprocess:
tests/ops/triton_cases.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_tensor_attn.ops.backend import triton_installed, use_triton
from tests.ops.test_tiled import TOL, assert_close_scaled
from tests.ops.triton_cases import ATTENTION_CASES, DECODE_CASES, NONFINITE_CASES

ROOT = Path(__file__).resolve().parents[2]

if not triton_installed():
    print("tests/ops/test_triton.py: kernel tests skipped, the `triton` package is not installed (pip install -e '.[dev]')")
needs_triton = pytest.mark.skipif(not triton_installed(), reason="the `triton` package is not installed")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case computed once, in one interpreter process (see tests/ops/triton_cases.py)."""
    out = tmp_path_factory.mktemp("triton") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "tests.ops.triton_cases", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(out)


def result(interpreted, name):
    entry = interpreted[name]
    if "error" in entry:
        pytest.fail(f"{name} raised in the interpreter process:\n{entry['error']}")
    return entry["actual"], entry["expected"]


@needs_triton
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_naive(interpreted, case):
    actual, expected = result(interpreted, f"attention/{case}")
    dtype = ATTENTION_CASES[case][-1]
    for name, a, e in zip(("out", "dq", "dk1", "dk2", "dv1", "dv2"), actual, expected):
        assert a.dtype == e.dtype == dtype and a.shape == e.shape, name
        assert_close_scaled(a, e, TOL[dtype], f"{case} {name}")


@needs_triton
@pytest.mark.parametrize("case", list(NONFINITE_CASES))
def test_nonfinite_inputs_change_the_rows_naive_changes(interpreted, case):
    """Prefill and decode with the kernels: the same non-finite entries as the naive op, the rest equal to it."""
    actual, expected = result(interpreted, f"nonfinite/{case}")
    for what, a, e in zip(("prefill", "decode"), actual, expected):
        bad = ~torch.isfinite(e)
        assert torch.equal(~torch.isfinite(a), bad), f"{case} {what}: non-finite entries differ from the naive op's"
        assert_close_scaled(a.masked_fill(bad, 0).double(), e.masked_fill(bad, 0), TOL[torch.float32], f"{case} {what}")


@needs_triton
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_matches_naive(interpreted, case):
    (dispatched, direct), (expected,) = result(interpreted, f"decode/{case}")
    torch.testing.assert_close(dispatched, direct, rtol=0, atol=0)  # the dispatch ran the kernel
    assert_close_scaled(dispatched, expected, TOL[DECODE_CASES[case][-1]], case)


@needs_triton
def test_model_generates_the_same_on_both_backends(interpreted):
    (triton_logits,), (torch_logits,) = result(interpreted, "model/generate")
    assert_close_scaled(triton_logits, torch_logits, TOL[torch.float32], "logits")


def test_backend_errors_name_the_problem(monkeypatch):
    q = torch.zeros(1, 1, 2, 16)
    with pytest.raises(ValueError, match="`backend` must be None"):
        use_triton("cuda", q)
    assert not use_triton(None, q)  # CPU tensors: the torch path
    assert not use_triton("torch", q)
    if triton_installed():
        with pytest.raises(ValueError, match="float64"):
            use_triton("triton", q.double())
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            use_triton("triton", q)
