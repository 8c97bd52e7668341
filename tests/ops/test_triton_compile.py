"""The Triton kernels compiled for real GPUs (sm_80, sm_90) on this CPU-only machine, as
scripts/bench/triton_resources.py compiles them: the package's launch of every TILES entry (per kernel, dtype and
head-dim bucket; at the GPU benchmark's shape) compiles with the installed triton without spilling registers and
within the shared memory every CUDA GPU since sm_80 offers a program (.ci/run runs this with both tested triton
releases); and the published tables, one run per release of triton_resources.RELEASES
(docs/triton_resources/triton-*/), describe the TILES in the code.

The interpreter tests (test_triton.py) check what the kernels compute; these check that a GPU can run them as
compiled, which the interpreter never does (it has no registers, layouts or shared memory)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hf_tensor_attn.ops.backend import triton_installed

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "docs" / "triton_resources"


def _nvidia_tools() -> bool:
    if not triton_installed() or importlib.util.find_spec("triton.backends.nvidia") is None:
        return False
    from triton import knobs

    return Path(knobs.nvidia.ptxas.path).exists() and Path(knobs.nvidia.cuobjdump.path).exists()


if not _nvidia_tools():
    print("tests/ops/test_triton_compile.py: skipped, triton with its NVIDIA backend (ptxas, cuobjdump) is not installed")
needs_tools = pytest.mark.skipif(not _nvidia_tools(), reason="triton's NVIDIA backend (ptxas, cuobjdump) is missing")
needs_triton = pytest.mark.skipif(not triton_installed(), reason="the `triton` package is not installed")


def _compile(jobs: list[tuple]) -> list[dict]:
    """scripts/bench/triton_resources.measure_one for each job, two at a time (CI has two cores)."""
    import concurrent.futures
    import multiprocessing

    from scripts.bench.triton_resources import measure_one

    # spawn, not fork: a forked child of a process that has run torch's OpenMP threads may hang in them
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(measure_one, jobs))


def _entries():
    from hf_tensor_attn.ops.exact.triton_kernels import TILES

    return sorted(TILES)  # (kernel, dtype, the largest head dim of the bucket)


ARCHS = (80, 90)


@pytest.fixture(scope="module")
def compiled():
    """Every package launch compiled for every target: {(kernel, dtype, D, arch): resources row}."""
    jobs = [(kernel, dtype, D, arch, None) for kernel, dtype, D in _entries() for arch in ARCHS]
    return {job[:4]: row for job, row in zip(jobs, _compile(jobs))}


@needs_tools
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel,dtype,D", _entries() if triton_installed() else [])
def test_package_launches_fit_every_gpu(compiled, kernel, dtype, D, arch):
    from scripts.bench.triton_resources import SHARED_LIMIT

    row = compiled[kernel, dtype, D, arch]
    assert not row["error"], f"{kernel} {dtype} d={D} sm_{arch} does not compile: {row['error']}"
    assert row["stack_bytes"] == 0, f"{kernel} {dtype} d={D} sm_{arch} spills registers: {row}"
    assert row["shared_bytes"] <= SHARED_LIMIT, f"{kernel} {dtype} d={D} sm_{arch}: too much shared memory: {row}"


@needs_tools
def test_a_spilling_launch_is_seen():
    # The check above can fail: the forward with 64 x 32 tiles on 4 warps spills on sm_90 (the dot's fp32
    # accumulator, the running output and the operands do not fit in 255 registers per thread).
    (row,) = _compile([("forward", "bf16", 128, 90, (64, 32, 4, 3))])
    assert row["package"] == 0 and row["stack_bytes"] > 0, row


@needs_triton
def test_every_tiles_entry_is_interpreted():
    """Each distinct launch shape of TILES runs in the interpreter tests (block sizes change the loops' edges)."""
    from hf_tensor_attn.ops.exact.triton_kernels import TILES, tiles
    from tests.ops.triton_cases import ATTENTION_CASES, DECODE_CASES

    shape = lambda kernel, dtype, D: (kernel, tiles(kernel, dtype, D).rows, tiles(kernel, dtype, D).cols)  # noqa: E731
    used = {shape("decode", case[-1], case[3]) for case in DECODE_CASES.values()}
    used |= {shape(kernel, case[-1], case[4]) for case in ATTENTION_CASES.values() for kernel in ("forward", "dq", "col")}
    missing = {(kernel, t.rows, t.cols) for (kernel, _, _), t in TILES.items()} - used
    # fp16 runs its own branch (FOLD off) of the forward and dq kernels
    assert any(case[-1] == torch.float16 for case in ATTENTION_CASES.values()), "no fp16 interpreter case"
    assert not missing, f"no interpreter case runs these (kernel, rows, cols): {sorted(missing)}"


def _published_runs() -> dict[str, list[dict]]:
    """{triton release: rows} of each published run (docs/triton_resources/triton-<release>/)."""
    from scripts.bench.harness import read_csv, read_run_record

    return {read_run_record(folder)["triton"]: read_csv(folder / "triton_resources.csv")
            for folder in sorted(PUBLISHED.glob("triton-*"))}


@needs_triton
def test_published_tables_describe_these_tiles():
    """docs/triton_resources holds a run with each triton release of RELEASES (the two CI tests among them), each
    made with the TILES in the code, and each entry is the first candidate that fits on every target in every one of
    them (the rule TILES states)."""
    from hf_tensor_attn.ops.backend import TRITON_NEWEST_TESTED, TRITON_OLDEST_TESTED
    from hf_tensor_attn.ops.exact.triton_kernels import TILES, tiles
    from scripts.bench.triton_resources import CANDIDATES, DTYPES, RELEASES, SETTINGS, SHARED_LIMIT, fits

    runs = _published_runs()
    assert {TRITON_OLDEST_TESTED, TRITON_NEWEST_TESTED} <= set(RELEASES)
    assert set(runs) == set(RELEASES), f"published runs: {sorted(runs)}, RELEASES: {RELEASES}"
    rerun = "rerun `python -m scripts.bench.triton_resources --candidates` with each triton of RELEASES"
    for release, rows in runs.items():
        own = [r for r in rows if r["package"]]
        published = {(r["kernel"], r["dtype"], r["head_dim"]) for r in own}
        assert published == set(TILES), f"triton {release}: published launches {sorted(published)} are not TILES'"
        for r in own:
            t = tiles(r["kernel"], DTYPES[r["dtype"]], r["head_dim"])
            assert (r["rows"], r["cols"], r["warps"], r["stages"]) == (t.rows, t.cols, t.num_warps, t.num_stages), (
                f"the triton {release} run was made with other TILES than the code's for {r}; {rerun}")
    for kernel, dtype, D in TILES:
        order = [(rc[0], rc[1], w, st) for rc in CANDIDATES[kernel] for w, st in SETTINGS]
        tried = [r for rows in runs.values() for r in rows
                 if not r["package"] and (r["kernel"], r["dtype"], r["head_dim"]) == (kernel, dtype, D)]
        found = {key: [r for r in tried if (r["rows"], r["cols"], r["warps"], r["stages"]) == key] for key in order}
        # every candidate compiled for both targets with every release, so "fits everywhere" is not vacuous
        assert all(len(found[key]) == len(ARCHS) * len(runs) for key in order), f"{kernel} {dtype} d={D}: missing rows"
        fitting = [key for key in order if all(fits(r, SHARED_LIMIT) for r in found[key])]
        t = tiles(kernel, DTYPES[dtype], D)
        assert fitting and fitting[0] == (t.rows, t.cols, t.num_warps, t.num_stages), (
            f"{kernel} {dtype} d={D}: TILES holds {t}, the first candidate that fits with every tested triton is "
            f"{fitting[0] if fitting else None}; {rerun}")
