"""The compiled CPU tile loops (`ops.extension`, `csrc/tiles.cpp`): used where they build, the Python loops where they
do not, and the same results either way (the numerics are in test_tiled.py, which runs both loops)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sysconfig
import warnings

import pytest
import torch
from torch.utils import cpp_extension

from hf_tensor_attn.ops import extension, naive_tensor_attention, tensor_attention
from hf_tensor_attn.ops.exact import tiled, tiles
from hf_tensor_attn.ops.exact.tiles import TileSizes

pytestmark = pytest.mark.usefixtures("one_thread")

# (w1, w2, padded): windowed on both streams (one tile per block), causal (many tiles, diagonal masks), one window
CASES = [(4, 9, False), (None, None, True), (None, 5, True), (6, None, False)]


def inputs(padded: bool, dtype=torch.float32, T=45, Tq=None, D=16, B=2, H=3):
    g = torch.Generator().manual_seed(1)
    q, k1, k2, v1, v2 = (torch.randn(B, H, T, D, generator=g, dtype=dtype) for _ in range(5))
    mask = torch.ones(B, T, dtype=torch.long)
    if padded:
        mask[:1, :7], mask[-1:, 20] = 0, 0  # (slices: B may be 0)
    return (q[:, :, T - (Tq or T):], k1, k2, v1, v2), (mask if padded else None)


@pytest.fixture
def loops(monkeypatch):
    """Counts the calls of the compiled ops and of the Python forward loop."""
    ops = extension.cpu_ops()
    if ops is None:
        pytest.skip("the compiled CPU tile loops could not be built here (see its RuntimeWarning)")
    counts = {"forward_tiles": 0, "backward_tiles": 0, "python": 0}

    class Counted:
        def __getattr__(self, name):
            counts[name] += 1
            return getattr(ops, name)

    monkeypatch.setattr(extension, "cpu_ops", lambda: Counted() if extension.enabled() else None)
    real = tiled._python_tiles

    def python_tiles(*args):
        counts["python"] += 1
        return real(*args)

    monkeypatch.setattr(tiled, "_python_tiles", python_tiles)
    return counts


def outputs_and_grads(x, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in x]
    out = tensor_attention(*leaves, **kw)
    return [out, *torch.autograd.grad(out, leaves, torch.ones_like(out))]


@pytest.mark.parametrize("w1, w2, padded", CASES)
def test_compiled_loops_run_by_default_and_match_python_loops(w1, w2, padded, loops, monkeypatch):
    x, mask = inputs(padded)
    kw = dict(scale=0.25, w1=w1, w2=w2, attention_mask=mask)
    compiled = outputs_and_grads(x, **kw)
    assert loops == {"forward_tiles": 1, "backward_tiles": 1, "python": 0}
    monkeypatch.setenv(extension.ENV, "0")
    python = outputs_and_grads(x, **kw)
    assert loops == {"forward_tiles": 1, "backward_tiles": 1, "python": 1}
    # The same GEMMs and exp; masked pairs add exact zeros instead of exp(floor) ~ 1e-35, so only rounding differs.
    for name, a, b in zip(("out", "dq", "dk1", "dk2", "dv1", "dv2"), compiled, python):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_default_tiles_over_a_wide_band_match_python_loops(loops, monkeypatch):
    """A column window of 290 makes bands of 305 keys, cut into two column blocks by the default tiles of a core with
    2 MiB of L2 (fixed here: the planner's column width follows the L2 size); with a row window of 40 (two row blocks
    of 32 and 8 offsets), padding, Tq < Tk and float64, through the backward too."""
    monkeypatch.setattr(tiles, "l2_size", lambda: (2 << 20, "test"))
    assert tiled.choose_tile_sizes(200, 40, 290).col == 256
    x, mask = inputs(True, torch.float64, T=300, Tq=200, D=8)
    kw = dict(scale=0.3, w1=290, w2=40, attention_mask=mask)
    compiled = outputs_and_grads(x, **kw)
    assert loops == {"forward_tiles": 1, "backward_tiles": 1, "python": 0}
    blocks = tiled.plan(200, 300, 40, 290, mask.bool(), tiled.choose_tile_sizes(200, 40, 290))
    assert max(len(b.col_blocks) for b in blocks) == 2 and max(len(b.row_blocks) for b in blocks) == 2
    monkeypatch.setenv(extension.ENV, "0")
    for name, a, b in zip(("out", "dq", "dk1", "dk2", "dv1", "dv2"), compiled, outputs_and_grads(x, **kw)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threads, B, H", [(2, 2, 3), (3, 2, 3), (2, 1, 3)])
def test_parallel_loops_match_python_loops(threads, B, H, dtype, loops, monkeypatch):
    """The module runs on one thread; here two or three, so the compiled loops split heads over torch's threads (where
    the build has OpenMP), windowed and causal, with padding: 6 heads on 2 threads, a sequence per thread; 6 heads on
    3, a thread with heads of two sequences (their own padding each); 3 heads on 2, which do not divide, so each step
    is split over the heads instead."""
    if "-fopenmp" not in extension.build_flags():
        pytest.skip(f"the compiled loops were built without OpenMP here ({extension.build_flags()}): one thread")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for w1, w2, padded in CASES[:2]:
            x, mask = inputs(padded, dtype, B=B, H=H)
            kw = dict(scale=0.25, w1=w1, w2=w2, attention_mask=mask)
            monkeypatch.setenv(extension.ENV, "1")
            compiled = outputs_and_grads(x, **kw)
            monkeypatch.setenv(extension.ENV, "0")
            tol = 1e-12 if dtype == torch.float64 else 1e-5  # float32: the same rounding as the one-thread test
            for name, a, b in zip(("out", "dq", "dk1", "dk2", "dv1", "dv2"), compiled, outputs_and_grads(x, **kw)):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    finally:
        torch.set_num_threads(before)
    assert loops["forward_tiles"] == 2 and loops["backward_tiles"] == 2


@pytest.mark.parametrize("threads, B, H", [(2, 2, 3), (2, 1, 3)])
def test_parallel_loops_report_scores_over_the_headroom(threads, B, H, loops):
    """As test_scores_over_the_headroom_take_the_python_loop, on two threads: one group of heads per thread (6 heads)
    and steps split over the heads (3), with the large scores in the last head only."""
    if "-fopenmp" not in extension.build_flags():
        pytest.skip(f"the compiled loops were built without OpenMP here ({extension.build_flags()}): one thread")
    x, _ = inputs(False, B=B, H=H)
    q = x[0].clone()
    q[-1, -1] *= 1e3  # scores up to ~1e4 in one head, against a headroom of 40
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = tensor_attention(q, *x[1:], scale=1.0, w1=5, w2=None)
    finally:
        torch.set_num_threads(before)
    assert loops == {"forward_tiles": 1, "backward_tiles": 0, "python": 1}
    expected = naive_tensor_attention(q.double(), *(t.double() for t in x[1:]), scale=1.0, w1=5, w2=None)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("w1, w2, padded", CASES[:2])
def test_empty_batch(w1, w2, padded, loops):
    """No heads at all (B = 0): empty outputs and gradients, and no mask written for a sequence that is not there."""
    x, mask = inputs(padded, B=0)
    out, *grads = outputs_and_grads(x, scale=0.25, w1=w1, w2=w2, attention_mask=mask)
    assert out.shape == x[0].shape and all(g.shape == t.shape for g, t in zip(grads, x))
    assert loops["forward_tiles"] == 1 and loops["backward_tiles"] == 1


def test_compiled_ops_refuse_wrong_shapes_and_plans_out_of_range(loops):
    """The C++ loops index raw memory from the shapes and the plan: a wrong one is an error, not a stray read."""
    BH, T, d, w_row = 2, 8, 4, 3
    x = {name: torch.randn(BH, T, d) for name in ("q", "kr", "kc", "vr", "vc")}
    x["m"] = torch.zeros(BH, T)
    blocks = tiled.plan(T, T, w_row, None, None, tiled.choose_tile_sizes(T, w_row, None))
    table, rows, cols = tiled.pack(blocks)
    ops = torch.ops.hf_tensor_attn_cpu

    def call(**changed):
        args = {**x, "table": table, "rows": rows, "cols": cols, **changed}
        return ops.forward_tiles(args["q"], args["m"], args["kr"], args["kc"], args["vr"], args["vc"], w_row, 0,
                                 args["table"], args["rows"], args["cols"], torch.empty(0, dtype=torch.bool), 1, -80.0,
                                 args.get("ceiling", 40.0))

    num, l, over = call()
    assert num.shape == (BH, T, d) and l.shape == (BH, T) and over is False
    with pytest.raises(RuntimeError, match=r"an input of shape \[2, 7, 4\] where \[2, 8, 4\] was expected"):
        call(vr=x["vr"][:, 1:].contiguous())
    with pytest.raises(RuntimeError, match=r"an input of shape \[2, 7\] where \[2, 8\] was expected"):
        call(m=x["m"][:, 1:].contiguous())
    with pytest.raises(RuntimeError, match=r"floor must be in \[-87, 0\] for Float, got -100"):
        ops.forward_tiles(x["q"], x["m"], x["kr"], x["kc"], x["vr"], x["vc"], w_row, 0, table, rows, cols,
                          torch.empty(0, dtype=torch.bool), 1, -100.0, 40.0)
    with pytest.raises(RuntimeError, match=r"ceiling must be in \(0, 88\] for Float, got 89"):
        call(ceiling=89.0)
    with pytest.raises(RuntimeError, match=r"ceiling must be in \(0, 88\] for Float, got 0"):
        call(ceiling=0.0)
    as_double = {name: t.double() for name, t in x.items()}
    with pytest.raises(RuntimeError, match=r"ceiling must be in \(0, 709\] for Double, got 710"):
        call(**as_double, ceiling=710.0)
    assert call(**as_double, ceiling=300.0)[2] is False
    with pytest.raises(RuntimeError, match=r"an input of shape \[2, 7\] where \[2, 8\] was expected"):
        ops.backward_tiles(x["q"], x["q"], x["m"][:, 1:].contiguous(), x["m"], x["kr"], x["vr"], x["kc"], x["vc"],
                           w_row, 0, table, rows, cols, torch.empty(0, dtype=torch.bool), 1, -80.0)
    late = table.clone()
    late[0, 1] = T + 1  # a query block past the queries
    with pytest.raises(RuntimeError, match="query block 0 of the plan is out of range"):
        call(table=late)
    wide = rows.clone()
    wide[0, 1] = w_row + 1  # window offsets past the window
    with pytest.raises(RuntimeError, match="row block 0 out of range"):
        call(rows=wide)
    no_columns = table.clone()
    no_columns[0, 6] = no_columns[0, 5]  # rows without columns: nothing would write their sums
    with pytest.raises(RuntimeError, match="query block 0 of the plan is out of range"):
        call(table=no_columns)


def test_scores_over_the_headroom_take_the_python_loop(loops):
    """The compiled loop has no running max: when an allowed score exceeds its reference by more than the headroom,
    it says so and the Python loops, which move the reference, compute the call."""
    x, _ = inputs(False)
    big = [t * 30 for t in x]  # scores up to ~1e5 against a headroom of 40
    out = tensor_attention(*big, scale=1.0, w1=5, w2=None)
    assert loops == {"forward_tiles": 1, "backward_tiles": 0, "python": 1}
    expected = naive_tensor_attention(*(t.double() for t in big), scale=1.0, w1=5, w2=None)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_loose_score_bound_stays_in_the_compiled_loop(loops):
    """Large inputs whose scores are all 0 (q and k1 use disjoint dimensions): a Cauchy-Schwarz bound on the scores
    (the Python loops') would allow overflow, the scores themselves do not, and the compiled loop computes the call."""
    x, _ = inputs(False)
    q, k1, k2, v1, v2 = (t.clone() for t in x)
    q[..., 8:], k1[..., :8] = 0, 0
    q, k1, k2 = q * 1e3, k1 * 1e3, k2 * 1e3
    out = tensor_attention(q, k1, k2, v1, v2, scale=1.0, w1=5, w2=None)
    assert loops == {"forward_tiles": 1, "backward_tiles": 0, "python": 0}
    expected = naive_tensor_attention(*(t.double() for t in (q, k1, k2, v1, v2)), scale=1.0, w1=5, w2=None)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_compiled_forward_reports_allowed_scores_over_the_ceiling(padded, loops):
    """forward_tiles reports an allowed pair's score minus the reference above the ceiling, not one at it, nor a
    masked pair's however large: a later key's, or a padded row or column key's."""
    T, d = 6, 2
    pad = torch.zeros(1, T, dtype=torch.bool)
    if padded:
        pad[0, 2] = True
    table, rows, cols = tiled.pack(tiled.plan(T, T, None, None, ~pad if padded else None,
                                              TileSizes(query=3, row=4, col=4)))

    def over(score, row_key=None, col_key=None, silent_queries=0):
        # s_t(a, b) = <q_t * kr_a, kc_b>: `score` for the pairs with row key `row_key` or column key `col_key`
        q, kr, kc, v = torch.ones(1, T, d), torch.full((1, T, d), 1 / d), torch.ones(1, T, d), torch.ones(1, T, d)
        q[0, T - silent_queries:] = 0  # these queries score 0 whatever the keys
        if row_key is not None:
            kr[0, row_key] = score / d
        if col_key is not None:
            kc[0, col_key] = score
        return torch.ops.hf_tensor_attn_cpu.forward_tiles(
            q, torch.ones(1, T), kr, kc, v, v, 0, 0, table, rows, cols,
            pad if padded else torch.empty(0, dtype=torch.bool), 1, -80.0, 40.0)[2]  # reference m = 1

    for key in (0, 4):
        assert over(41.5, row_key=key) and over(41.5, col_key=key)
        assert not over(41.0, row_key=key) and not over(41.0, col_key=key)  # exactly the ceiling over m
    # key 5 pairs only with query 5, silenced: for queries 0-4 it is a later key
    assert not over(1e30, row_key=5, silent_queries=1) and not over(1e30, col_key=5, silent_queries=1)
    assert over(1e30, row_key=5) and over(1e30, col_key=5)
    if padded:
        assert not over(1e30, row_key=2) and not over(1e30, col_key=2)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty build cache, and no library loaded into this process (the test's "loads" are recorded instead)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setattr(extension, "_state", dict(extension._state))
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    return loaded


def test_failed_build_warns_and_falls_back(empty_cache, monkeypatch):

    def no_compiler(*args, **kwargs):  # what torch raises on a machine without a C++ compiler
        raise RuntimeError(
            "Error building extension 'x': [1/2] c++ -MMD -MF tiles.o.d -fPIC -c tiles.cpp -o tiles.o\n"
            "FAILED: [code=127] tiles.o\nc++ -MMD -MF tiles.o.d -fPIC -c tiles.cpp -o tiles.o\n"
            "/bin/sh: 1: c++: not found\nninja: build stopped: subcommand failed.\n"
        )

    monkeypatch.setattr(extension, "_compile", no_compiler)
    with pytest.warns(RuntimeWarning, match=r"could not build or load the compiled CPU tile loops \(RuntimeError: "
                                            r"/bin/sh: 1: c\+\+: not found\); the tiled op runs its Python loops"):
        assert extension.build() is None
    assert empty_cache == [] and extension.describe()["failure"] == "RuntimeError: /bin/sh: 1: c++: not found"
    monkeypatch.setattr(extension, "_loaded", extension.build)  # as if this process's one attempt had failed
    x, mask = inputs(True, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = tensor_attention(*x, scale=0.25, w1=3, w2=None, attention_mask=mask)
    monkeypatch.undo()
    monkeypatch.setenv(extension.ENV, "0")
    torch.testing.assert_close(out, tensor_attention(*x, scale=0.25, w1=3, w2=None, attention_mask=mask))


def fake_compile(calls, fail_openmp=None):
    """A stand-in for the child build: records (name, flags) and writes a file where the library goes."""

    def compile(path, flags, lock):
        calls.append((path.name.removesuffix(".so"), flags))
        if fail_openmp and "-fopenmp" in flags:
            raise RuntimeError(fail_openmp)
        path.write_bytes(b"a library")

    return compile


def test_failed_openmp_build_retries_without(empty_cache, monkeypatch, caplog):
    """A compiler without OpenMP (or clang's, whose calls torch's GNU runtime lacks): the same loops, one thread."""
    calls = []
    monkeypatch.setattr(extension, "_compile", fake_compile(
        calls, "Error building extension 'x':\ntiles.cpp:1: fatal error: omp.h: No such file or directory"))
    monkeypatch.setattr(torch.backends.openmp, "is_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # not a failure: no warning
        assert extension.build() is not None
    assert [name for name, _ in calls] == [extension.library_name(True), extension.library_name(False)]
    assert calls[0][1] == extension.compile_flags(True) and "-fopenmp" not in calls[1][1]
    assert extension.build_flags() == calls[1][1] and empty_cache == [extension.describe()["library"]]
    assert "built without OpenMP" in caplog.text and "omp.h: No such file or directory" in caplog.text


def test_without_openmp_in_torch_one_attempt_without_it(empty_cache, monkeypatch):

    calls = []
    monkeypatch.setattr(extension, "_compile", fake_compile(calls))
    monkeypatch.setattr(torch.backends.openmp, "is_available", lambda: False)
    extension.build()
    assert [flags for _, flags in calls] == [extension.compile_flags(False)] and "-fopenmp" not in calls[0][1]
    assert extension.build_flags() == calls[0][1]


def test_build_flags_follow_torch(monkeypatch):
    """The instruction set torch's kernels use here (ATen's own choice) and OpenMP: in the flags and the name."""
    monkeypatch.setattr(extension, "_capability", lambda: "AVX2")
    assert extension.compile_flags(True) == ["-O3", "-mavx2", "-mfma", "-fno-trapping-math", "-fopenmp"]
    assert extension.library_name(True).endswith("_avx2_omp") and extension.library_name(False).endswith("_avx2")
    monkeypatch.setattr(extension, "_capability", lambda: "DEFAULT")
    assert extension.compile_flags(False) == ["-O3", "-fno-trapping-math"]
    monkeypatch.setattr(extension, "_capability", lambda: "Z VECTOR")  # a name torch may give, with a space
    assert extension.library_name(False).endswith("_z_vector")


def test_switched_off_never_builds(monkeypatch):
    monkeypatch.setenv(extension.ENV, "0")
    monkeypatch.setattr(extension, "_loaded", lambda: pytest.fail("built although switched off"))
    assert extension.cpu_ops() is None


@pytest.mark.parametrize("value", ["yes", "2", ""])
def test_bad_switch_value_names_variable_and_values(value, monkeypatch):
    monkeypatch.setenv(extension.ENV, value)
    with pytest.raises(ValueError, match=rf"{extension.ENV} must be 0 .* or 1 .* got '{value}'"):
        extension.cpu_ops()


def test_library_name_carries_torch_version_source_and_flags(tmp_path, monkeypatch):
    name = extension.library_name()
    assert name.startswith("hf_tensor_attn_cpu_" + torch.__version__.replace(".", "_").replace("+", "_") + "_")
    flags = extension.compile_flags
    monkeypatch.setattr(extension, "compile_flags", lambda openmp=True: [*flags(openmp), "-fno-math-errno"])
    assert extension.library_name() != name  # new flags: a build of their own, not the one cached without them
    monkeypatch.setattr(extension, "compile_flags", flags)
    changed = tmp_path / "tiles.cpp"
    changed.write_bytes(extension.SOURCE.read_bytes() + b"\n// another checkout\n")
    monkeypatch.setattr(extension, "SOURCE", changed)
    assert extension.library_name() != name


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_exp_passes_vectorise(capability, tmp_path, monkeypatch):
    """The compiled loops' speed rests on the exp passes (exp_scores, exp_score_grads, the decode step's max and exp,
    and its bias add when the rows carry weights) running in vector registers: scalar, the backward measured slower
    than the Python loops. GCC says which loops it vectorised
    (-fopt-info-vec); here for the AVX2 flags (no masked operations: without -fno-trapping-math three of the four
    loops over a tile row stayed scalar) and the AVX-512 ones, compiling only (no CPU needs to run it)."""
    cxx = cpp_extension.get_cxx_compiler()  # the compiler the build uses (CXX, or c++)
    if shutil.which(cxx) is None or not cpp_extension.check_compiler_is_gcc(cxx):
        pytest.skip(f"the C++ compiler here ({cxx}) is not GCC: GCC's vectorisation report is what this test reads")
    monkeypatch.setattr(extension, "_capability", lambda: capability)
    source = extension.SOURCE.read_text().splitlines()
    loops = [i + 1 for i, line in enumerate(source) if "for (int64_t i = lo_t * ba; i < hi_t * ba; ++i)" in line]
    assert len(loops) == 4  # exp_scores and exp_score_grads, masked and unmasked rows each
    decode = [i + 1 for i, line in enumerate(source) if "for (int64_t j = 0; j < c; ++j)" in line]
    assert len(decode) == 5  # the decode step's max and exp passes, with and without a column mask; a biased step's add
    loops += decode
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    done = subprocess.run(
        [cxx, "-c", "-o", str(tmp_path / "tiles.o"), "-std=c++20", "-fPIC", *extension.compile_flags(False),
         "-fopt-info-vec-optimized", *(f"-I{p}" for p in includes), str(extension.SOURCE)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    vectorised = {int(m) for m in re.findall(r"tiles\.cpp:(\d+):\d+: optimized: loop vectorized", done.stderr)}
    assert set(loops) <= vectorised, f"not vectorised with {extension.compile_flags(False)}: lines {sorted(set(loops) - vectorised)}"


def test_compiled_exp_matches_float64_exp_over_the_clamp_range(loops):
    """The float exp of the compiled tile pass (Cephes' expf, vectorised by the compiler), read through the forward.
    Each head has 32 queries, each paired with its own row key (w_row = 1) and the column keys up to it: column key 0
    scores 0, every other one -1000 (clamped to the floor, e^-80 each), and query t's reference is m_t = -x_t, so
    l_t = exp(x_t) + t e^-80; column key 0 is a run of 32 entries of one tile row, the loop's vector body. Below the
    floor exp gives exp(floor); a NaN stays NaN (the op's non-finite check relies on it)."""
    N, Tq, d = 6250, 32, 4
    x = torch.linspace(-50.0, 40.0, N * Tq, dtype=torch.float64).view(N, Tq)
    x[0, :5] = torch.tensor([0.0, -1e-7, 1e-7, -100.0, float("nan")], dtype=torch.float64)
    q, kc, ones = torch.zeros(N, Tq, d), torch.zeros(N, Tq, d), torch.ones(N, Tq, d)
    q[..., 0], kc[:, 1:, 0] = 1.0, -1000.0
    table, rows, cols = tiled.pack(tiled.plan(Tq, Tq, 1, None, None, TileSizes(query=Tq, row=1, col=Tq)))
    assert table.shape[0] == rows.shape[0] == cols.shape[0] == 1  # one tile
    m = (-x).float()
    num, l, over = torch.ops.hf_tensor_attn_cpu.forward_tiles(q, m, ones, kc, ones, ones, 1, 0, table, rows, cols,
                                                              torch.empty(0, dtype=torch.bool), 1, -80.0, 40.0)
    assert not over  # x <= 40
    arg = (-m).double()  # the float argument the op sees
    expected = arg.clamp_min(-80.0).exp() + torch.arange(Tq, dtype=torch.float64) * math.exp(-80.0)
    finite = ~x.isnan()
    rel = ((l.double() - expected) / expected)[finite].abs()
    assert rel.max() <= 2e-7, f"max relative error {rel.max():.3g} at x = {x[finite][rel.argmax()]:.6g}"
    torch.testing.assert_close(num[..., 0][finite], l[finite], rtol=1e-6, atol=0)
    assert l[0, 4].isnan() and num[0, 4].isnan().all() and finite[0, 5:].all() and l[0, 5:].isfinite().all()
