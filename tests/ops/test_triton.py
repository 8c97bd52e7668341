"""The Triton kernels (`ops.exact.triton_kernels`) against `naive_tensor_attention`: forward, all five gradients and
the four-cache decode step, on CPU tensors in Triton's interpreter. The cases and why they run in a subprocess:
tests/ops/triton_cases.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from packaging.version import Version

from hf_tensor_attn.ops import backend
from hf_tensor_attn.ops.dispatch import use_triton
from hf_tensor_attn.ops.backend import (
    TRITON_NEWEST_TESTED, TRITON_OLDEST_TESTED, UntestedTritonWarning, triton_installed, triton_version,
)
from tests.ops.test_tiled import TOL, assert_close_scaled
from tests.ops.triton_cases import ATTENTION_CASES, DECODE_CASES, NONFINITE_CASES

ROOT = Path(__file__).resolve().parents[2]

if not triton_installed():
    print("tests/ops/test_triton.py: kernel tests skipped, the `triton` package is not installed (pip install -e '.[dev]')")
needs_triton = pytest.mark.skipif(not triton_installed(), reason="the `triton` package is not installed")


# "cuda": the cases run compiled on the GPU instead of in the interpreter (scripts/bench/gpu_check.sh sets it)
CASES_DEVICE = os.environ.get("TRITON_CASES_DEVICE", "cpu")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case computed once, in two interpreter processes that split the cases (see tests/ops/triton_cases.py;
    the interpreter runs on one core, CI has two)."""
    folder = tmp_path_factory.mktemp("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1" if CASES_DEVICE == "cpu" else "0", "OMP_NUM_THREADS": "1"}
    shards = 2
    runs = [subprocess.Popen([sys.executable, "-m", "tests.ops.triton_cases", str(folder / f"{shard}.pt"),
                              "--device", CASES_DEVICE, "--shard", str(shard), "--shards", str(shards)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for shard in range(shards)]
    results = {}
    for shard, run in enumerate(runs):
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-4000:]
        results.update(torch.load(folder / f"{shard}.pt"))
    return results


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
def test_packed_documents_with_the_kernels(interpreted):
    actual, expected = result(interpreted, "packed/documents")
    for name, a, e in zip(("out", "dq", "dk1", "dk2", "dv1", "dv2"), actual, expected):
        assert_close_scaled(a, e, TOL[torch.float32], f"packed {name}")


@needs_triton
def test_fp16_autocast_runs_the_kernels_in_fp16(interpreted):
    actual, expected = result(interpreted, "autocast/fp16")
    assert actual[0].dtype == torch.float16  # the output in the autocast dtype; gradients in their leaves' fp32
    for name, a, e in zip(("out", "dq", "dk1", "dk2", "dv1", "dv2"), actual, expected):
        assert_close_scaled(a.double(), e, TOL[torch.float16], f"autocast {name}")


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


def test_a_self_contained_copy_has_no_kernels(monkeypatch):
    """A self-contained checkpoint's copy of this code (`remote_code`) is flat files in one package, without the
    kernels or the `exact` sub-package they live in: it runs the torch path whether or not triton is installed."""
    monkeypatch.setattr(backend, "__package__", "hf_tensor_attn")  # a package that holds no `exact`
    assert backend.triton_installed.__wrapped__() is False


def test_tested_triton_releases_are_the_declared_pinned_and_ci_ones():
    """pyproject's lower bound is the oldest tested release, configs/constraints.txt pins the newest (the one
    torch==2.13.0's CUDA build requires) and .ci/run installs the oldest in its second environment."""
    for spec in re.findall(r'"triton([^"]*)"', (ROOT / "pyproject.toml").read_text()):
        assert spec == f">={TRITON_OLDEST_TESTED}", spec
    pins = dict(line.split("==") for line in (ROOT / "configs/constraints.txt").read_text().split() if "==" in line)
    assert pins["triton"] == TRITON_NEWEST_TESTED
    assert "TRITON_OLDEST_TESTED" in (ROOT / ".ci/run").read_text()
    if triton_installed():
        installed = triton_version()
        assert Version(TRITON_OLDEST_TESTED) <= installed, installed
        assert installed.release[:2] <= Version(TRITON_NEWEST_TESTED).release[:2], installed


def test_triton_outside_the_tested_range(monkeypatch):
    """Too old: CUDA tensors run torch with one warning (auto), backend='triton' says why; newer: one warning."""
    cuda = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda", 0))
    oldest = re.escape(TRITON_OLDEST_TESTED)
    monkeypatch.setattr(backend, "triton_installed", lambda: True)

    def installed(release):
        monkeypatch.setattr(backend, "triton_version", lambda: Version(release))
        backend.triton_release_problem.cache_clear()

    backend._warn_once.cache_clear()
    installed("3.0.0")
    with pytest.warns(RuntimeWarning, match=rf"torch path: the installed triton 3\.0\.0 is older than {oldest}") as seen:
        assert not use_triton(None, cuda)
        assert not use_triton(None, cuda)
    assert len(seen) == 1
    with pytest.raises(ValueError, match=rf"backend='triton': the installed triton 3\.0\.0 is older than {oldest}"):
        use_triton("triton", cuda)
    installed("3.99.0")
    with pytest.warns(UntestedTritonWarning, match=rf"tested with triton {oldest} to .* 3\.99\.0 is newer") as seen:
        assert use_triton(None, cuda) and use_triton("triton", cuda)
    assert len(seen) == 1
    newest = Version(TRITON_NEWEST_TESTED)
    for tested in (TRITON_OLDEST_TESTED, TRITON_NEWEST_TESTED, f"{newest.major}.{newest.minor}.{newest.micro + 1}"):
        installed(tested)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert use_triton(None, cuda) and use_triton("triton", cuda)
    monkeypatch.undo()
    backend.triton_release_problem.cache_clear()
    backend._warn_once.cache_clear()
