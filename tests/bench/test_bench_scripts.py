"""Every benchmark and evaluation script runs end to end at its smallest sizes and writes its CSV, run record,
table file and plot, the table file being what its `render` builds from those files; quick runs cannot write into
docs/. Timings at these sizes mean nothing and are not looked at. (scripts/quickstart.py is run by
tests/training/test_quickstart.py, scripts/train.py by tests/training.)"""

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.bench import (bench_attention, bench_cache, bench_compiled_decode, bench_decode, bench_poly,
                           convert_llama_experiment, eval_long_context, eval_subgen, match3_experiment,
                           profile_attention)
from scripts.bench.harness import read_csv, read_run_record, render_folder

ROOT = Path(__file__).resolve().parents[2]

# (how the script is started, the files it must write). Both ways of starting a script are covered.
SCRIPTS = {
    "bench_attention": (["scripts/bench/bench_attention.py"], ["bench_attention.csv", "bench_attention.png"]),
    "bench_cache": (["-m", "scripts.bench.bench_cache"], ["bench_cache.csv", "bench_cache.png"]),
    "bench_compiled_decode": (["-m", "scripts.bench.bench_compiled_decode"],
                              ["bench_compiled_decode.csv", "bench_compiled_decode.png"]),
    "bench_decode": (["-m", "scripts.bench.bench_decode"], ["bench_decode.csv", "profile.csv", "bench_decode.png"]),
    "eval_subgen": (["-m", "scripts.bench.eval_subgen"],
                    ["synthetic.csv", "model.csv", "lowdim.csv", "eval_subgen.png"]),
    "bench_poly": (["-m", "scripts.bench.bench_poly"],
                   ["error.csv", "runtime.csv", "match3.csv", "throughput.csv", "memory.csv", "bench_poly.png"]),
    "eval_long_context": (["-m", "scripts.bench.eval_long_context"], ["text.csv", "run.json", "eval_long_context.png"]),
    "match3_experiment": (["scripts/bench/match3_experiment.py"],
                          ["runs.csv", "curves.csv", "test_set.csv", "curves.png"]),
    "convert_llama_experiment": (["-m", "scripts.bench.convert_llama_experiment"],
                                 ["convert_llama_summary.csv", "convert_llama_curves.csv", "convert_llama_curves.png"]),
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_quick_run_writes_csv_table_and_plot(name, tmp_path):
    start, files = SCRIPTS[name]
    out = tmp_path / "out"
    extra = (["--work_dir", str(tmp_path / "runs")]
             if name in ("match3_experiment", "bench_poly", "convert_llama_experiment") else [])
    # The checkout first on the path, so the run uses this tree's package whatever is installed.
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, *start, "--quick", "--out", str(out), *extra], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for filename in files:
        assert (out / filename).stat().st_size > 0, filename
    for path in out.glob("*.csv"):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows, path
        assert {"cpu", "cpu_capability", "cores", "threads", "torch"} <= set(rows[0]), path  # the machine it ran on
    tables = (out / "tables.md").read_text()
    assert "Machine: " in tables and "Load: " in tables and "\n| " in tables
    assert read_run_record(out)["module"] == f"scripts.bench.{name}"
    assert tables == render_folder(out)  # a normal run publishes exactly what --from-csv would rebuild


@pytest.mark.parametrize("module", [bench_attention, bench_cache, bench_compiled_decode, bench_decode, bench_poly,
                                    eval_subgen, eval_long_context, match3_experiment, convert_llama_experiment,
                                    profile_attention])
def test_quick_run_refuses_to_write_into_docs(module, capsys):
    with pytest.raises(SystemExit):
        module.parse_args(["--quick", "--out", str(ROOT / "docs" / "smoke")])
    assert "may not write under" in capsys.readouterr().err
    assert not (ROOT / "docs" / "smoke").exists()


def test_eval_long_context_page_rebuilds_from_its_files_alone(tmp_path):
    """--from-csv rebuilds tables.md from text.csv and run.json: the same text as the run wrote; every method of the
    comparison ran."""
    out = tmp_path / "out"
    eval_long_context.main(["--quick", "--out", str(out), "--models", "unwindowed"])
    written = (out / "tables.md").read_text()
    (out / "tables.md").unlink()
    eval_long_context.main(["--from-csv", str(out)])
    assert (out / "tables.md").read_text() == written
    methods = {r["method"] for r in read_csv(out / "text.csv")}
    assert methods == {"exact", "window", "sinks+window", "score", "random", "recompute", "subgen δ", "subgen budget"}


@pytest.mark.parametrize("gap, ranks", [(0.05, True), (0.001, False)])
def test_eval_long_context_draws_no_verdict_from_a_model_that_ignores_its_context(gap, ranks):
    """The ranking is drawn only when keeping the last 32 tokens costs more than RANK_SE paired standard errors."""
    def row(method, tokens, losses):
        return dict(method=method, tokens=tokens, setting=f"{tokens} tokens", memory_bytes_per_seq=64 * (tokens or 99),
                    loss=sum(losses) / len(losses), loss_per_seq=" ".join(map(str, losses)), loss_second_half=0.0)

    exact = [1.0, 1.2, 0.9, 1.1]
    noise = [0.01, -0.01, 0.012, -0.008]
    rows = [row("exact", "", exact)] + [
        row("window", w, [e + gap * 32 / w + n for e, n in zip(exact, noise)]) for w in (16, 32, 64)]
    lines, rankable = eval_long_context.uses_context(rows)
    assert rankable is ranks
    assert ("cannot rank caches" in lines[-1]) is not ranks


def test_a_match3_run_of_some_cells_is_partial_and_refuses_docs(capsys):
    with pytest.raises(SystemExit):
        match3_experiment.parse_args(["--cells", "8,8", "--out", str(ROOT / "docs" / "smoke")])
    assert "may not write under" in capsys.readouterr().err
    assert not (ROOT / "docs" / "smoke").exists()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the `triton` package is not installed")
def test_cuda_mode_starts_under_the_triton_interpreter(tmp_path):
    """The GPU command (`bench_attention --cuda`) end to end at its quick sizes, CPU tensors standing in for CUDA
    ones in Triton's interpreter: what a GPU run executes, except the device."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), TRITON_INTERPRET="1",
               OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "scripts.bench.bench_attention", "--cuda", "--device", "cpu", "--quick",
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out / "bench_attention_gpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["what"], r["mode"]) for r in rows} == {("attention", "causal"), ("attention", "window"), ("decode", "")}
    assert all(float(r["fwdbwd_tflops"]) > 0 for r in rows if r["what"] == "attention")
    written = (out / "tables.md").read_text()
    assert "Four-cache decode step" in written
    # --from-csv rebuilds the same text from the files alone, here without CUDA and without the interpreter
    (out / "tables.md").unlink()
    rebuild = subprocess.run([sys.executable, "-m", "scripts.bench.bench_attention", "--cuda", "--from-csv",
                              "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rebuild.returncode == 0, rebuild.stderr[-3000:]
    assert (out / "tables.md").read_text() == written


def test_profile_attention_quick_run(tmp_path):
    rows = profile_attention.main(["--quick", "--out", str(tmp_path)])
    assert {r["case"] for r in rows} == {*profile_attention.CASES, "four-cache decode"}
    for r in rows:
        shares = [r[f"share_{c}"] for c in [*profile_attention.CATEGORIES, "other"]]
        # a small decode step's products are the compiled loop's own (no ATen GEMM under it)
        assert abs(sum(shares) - 1) < 1e-6 and r["share_GEMM"] + r["share_C++ loops"] > 0, r
    assert (tmp_path / "profile_attention.png").stat().st_size > 0


@pytest.mark.parametrize("op, expected", [
    ("aten::bmm", "GEMM"), ("aten::baddbmm_", "GEMM"), ("aten::addmm_", "GEMM"), ("aten::exp_", "exp"),
    ("aten::div_", "elementwise"), ("hf_tensor_attn_cpu::forward_tiles", "C++ loops"),
    ("hf_tensor_attn_cpu::backward_tiles", "C++ loops"), ("aten::narrow", "other"),
])
def test_profile_attention_categories_of_the_ops_the_loops_call(op, expected):
    """In-place GEMMs (pv.baddbmm_ accumulates over column blocks) once fell into "other", booked as loop time."""
    assert profile_attention.category(op) == expected


def test_profile_attention_baseline_runs_the_other_checkouts_package(tmp_path, capfd):
    """--baseline DIR: every job once on DIR's package (in a child process) and once on this one, and the table
    says which row is which. DIR here is a copy of the package that marks itself, so the test sees the child
    really imported DIR's code and not this checkout's."""
    other = tmp_path / "before"
    shutil.copytree(ROOT / "hf_tensor_attn", other / "hf_tensor_attn")
    ops = other / "hf_tensor_attn" / "ops" / "__init__.py"
    ops.write_text(ops.read_text() + "\nimport sys\nprint('BASELINE-PACKAGE', file=sys.stderr)\n")
    out = tmp_path / "out"
    rows = profile_attention.main(["--quick", "--out", str(out), "--baseline", str(other)])
    assert [r["code"] for r in rows] == ["baseline", "current"] * (2 * len(profile_attention.CASES) + 1)
    assert "BASELINE-PACKAGE" in capfd.readouterr().err  # the child's stderr is this process's
    text = (out / "tables.md").read_text()
    assert "| before |" in text and "| after |" in text and "before the change (unknown (not a git checkout))" in text
    with pytest.raises(SystemExit):
        profile_attention.parse_args(["--quick", "--out", str(out), "--baseline", str(tmp_path / "missing")])


def test_bench_attention_target_verdicts_read_the_interleaved_median():
    """A one-shot ratio over the target with an interleaved median under it is judged on the median."""
    row = {"mode": "window", "T": 1024, "w1": 128, "w2": 32, "fwd_of_mm": 0.61, "fwdbwd_of_mm": 0.20, "fwd_s": 0.05,
           "mm_gflops": 250.0}
    again = {"mode": "window", "T": 1024, "pass": "fwd", "rounds": 9, "median_of_mm": 0.45, "lowest_of_mm": 0.40,
             "highest_of_mm": 0.62}
    line = next(line for line in bench_attention.findings([row], [again]) if "Windowed targets" in line)
    assert ("forward at least 50% of torch.mm: not met, median 45.0% of 9 interleaved rounds (40.0%-62.0%; "
            "table 61%)") in line
    assert "forward+backward at least 35%: not met, 20%." in line
    line = next(line for line in bench_attention.findings([row]) if "Windowed targets" in line)
    assert "forward at least 50% of torch.mm: met, 61%;" in line


def test_bench_attention_fused_reference_rows_see_their_querys_window():
    """The fused-attention reference's mask: row (t, a) of a query block starting at t0 may use exactly the keys
    (t0 + t - w_col, t0 + t] of the block's band, whose key c is t0 - w_col + 1 + c."""
    bq, w_row, w_col, t0 = 4, 3, 5, 20
    mask = bench_attention.band_mask(bq, w_row, w_col)
    assert mask.shape == (bq * w_row, w_col + bq - 1)
    for row in range(bq * w_row):
        t = t0 + row // w_row
        keys = [t0 - w_col + 1 + c for c in range(mask.shape[1]) if mask[row, c]]
        assert keys == list(range(t - w_col + 1, t + 1)), row


def test_bench_attention_fused_reference_is_credited_with_its_own_work():
    """Every block of the reference is interior (full windows), so it does more than the op's allowed pairs at the
    start of the sequence: its ratio must use its own flops, 4 * d per allowed (row, key) entry of every block."""
    T, w1, w2, B, H, D = 40, 12, 4, 1, 2, 8
    forward, forward_backward, flops = bench_attention.fused_reference_calls(T, w1, w2, B, H, D, 0.3)
    bq = bench_attention.choose_tile_sizes(T, w2, w1).query
    assert flops == 4 * D * -(-T // bq) * B * H * bq * w2 * w1
    assert flops > 4 * D * B * H * bench_attention.allowed_pairs_count(T, w1, w2)
    forward()
    forward_backward()


def test_bench_attention_reports_the_fused_reference_beside_the_op():
    row = {"mode": "window512", "T": 1024, "w1": 512, "w2": 32, "fwd_of_mm": 0.40, "fwdbwd_of_mm": 0.30,
           "fwd_s": 0.05, "mm_gflops": 250.0}
    again = [{"mode": "window512", "T": 1024, "pass": what, "rounds": 9, "median_of_mm": op, "lowest_of_mm": op,
              "highest_of_mm": op, "fused_median_of_mm": fused, "fused_lowest_of_mm": fused,
              "fused_highest_of_mm": fused} for what, op, fused in (("fwd", 0.426, 0.459), ("fwdbwd", 0.346, 0.424))]
    lines = bench_attention.findings([row], again)
    assert ("torch's fused attention kernel on the op's rows and column bands, same rounds: forward 45.9%, "
            "forward+backward 42.4% of torch.mm (the op: 42.6%, 34.6%).") in "\n".join(lines)
    # rounds without the reference (causal cases, or CSVs written before it existed) print no such line
    for t in again:
        t["fused_median_of_mm"] = ""
    assert not any("fused attention" in line for line in bench_attention.findings([row], again))


def test_bench_attention_refuses_negative_target_rounds(capsys):
    with pytest.raises(SystemExit):
        bench_attention.parse_args(["--quick", "--target-rounds", "-1", "--out", "/tmp/unused"])
    assert "--target-rounds must be 0 (no interleaved rounds) or more, got -1" in capsys.readouterr().err


def test_bench_attention_python_loop_switches_the_compiled_loop_off_for_the_call_only(monkeypatch):
    from hf_tensor_attn.ops import extension

    monkeypatch.setenv(extension.ENV, "1")
    seen = bench_attention.python_loop(lambda: os.environ[extension.ENV])()
    assert seen == "0" and os.environ[extension.ENV] == "1"
    monkeypatch.delenv(extension.ENV)
    bench_attention.python_loop(lambda: None)()
    assert extension.ENV not in os.environ


def test_run_record_notes_a_checkout_that_changed_during_the_run(monkeypatch):
    """The code version is taken when the run starts (its first load snapshot) and again when the record is written:
    a file edited or a commit made meanwhile shows in the record instead of passing for the measured code."""
    from scripts.bench import harness

    versions = iter(["commit A", "commit A, with uncommitted changes to hf_tensor_attn/ or scripts/"])
    monkeypatch.setattr(harness, "code_version", lambda: next(versions))
    monkeypatch.setattr(harness, "_code_at_start", None)
    harness.load_snapshot()
    harness.load_snapshot()  # later snapshots leave the start alone
    code = harness.run_record("m", [], "t", None, "load")["code"]
    assert code == ("commit A at the start of the run; commit A, with uncommitted changes to hf_tensor_attn/ or "
                    "scripts/ at its end")
    monkeypatch.setattr(harness, "code_version", lambda: "commit A")
    monkeypatch.setattr(harness, "_code_at_start", "commit A")
    assert harness.run_record("m", [], "t", None, "load")["code"] == "commit A"


def test_run_command_names_the_instruction_set_it_was_started_with(monkeypatch):
    # A page measured on the AVX2 build (ATEN_CPU_CAPABILITY=avx2) says so in its command, so it can be rerun as such.
    from scripts.bench.harness import command_line

    for name in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(name, raising=False)
    assert command_line("scripts.bench.bench_cache", ["--out", "x y"]) == "python -m scripts.bench.bench_cache --out 'x y'"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert command_line("scripts.bench.bench_cache", []) == "ATEN_CPU_CAPABILITY=avx2 python -m scripts.bench.bench_cache"
