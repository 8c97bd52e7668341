"""What every benchmark and evaluation in scripts/bench shares: timing, peak memory, the machine's own GEMM rate,
a record of the machine and its load, and where and how results are written.

Timing uses `torch.utils.benchmark.Timer.blocked_autorange` (it picks a block size, warms up and sets the thread
count) and adds what a shared machine needs: each measurement is checked against the CPU time other processes took
meanwhile (/proc/stat), and a disturbed one is retried for up to `wait_idle` seconds. Peak memory is the growth of
the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs) over one call: unlike
tracemalloc or the torch profiler it counts every byte the call touches, MKL and OpenMP buffers included, and unlike
`resource.getrusage` it can be reset between calls.

Every CSV row and every table file carries the machine it was measured on (CPU model and id, torch's vector
capability, cores, threads, torch version), because the same code gives different ratios on different CPUs.

The publishing convention (every script that writes into docs/ follows it; tests/bench/test_docs_regenerate.py
checks it for every docs/NAME/ folder that holds a run record)
--------------------------------------------------------------------------------------------------------------
1. A run writes its measurements as CSV files (`write_csv`) and a run record, `run.json` (`write_run_record`):
   the module that wrote it, the command, the code version, the machine, the load around the run and the title.
2. The script has a function `render(folder: Path) -> str` that builds the whole text of `tables.md` -- every
   table and every sentence that contains a number -- from the files in `folder` alone (`read_run_record`,
   `read_csv`); no constant in the script carries a measured figure. It may use the package (e.g. to rebuild a
   deterministic data set), never the clock, the machine or a random draw.
3. A normal run ends with `publish(out, render)`, which writes `tables.md = render(out)`; `--from-csv` calls the
   same on an existing folder, so the committed text can always be rebuilt from the committed data.
4. Interpretive prose in docs/*.md quotes no figure; it points at the rendered `tables.md`.
A new script only needs `render` and a `run.json` whose "module" names it (e.g. "scripts.bench.my_script").
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import ctypes
import gc
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RUNS = ROOT / "runs" / "bench"

# A measurement during which other processes took more than this share of one core is called disturbed.
OTHERS_MAX_CORES = 0.15
HAVE_PROC = os.path.exists("/proc/stat")


# ---------------------------------------------------------------------------------------------------------------
# The machine and its load
# ---------------------------------------------------------------------------------------------------------------


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    if not os.path.exists("/proc/cpuinfo"):
        return fields
    with open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    return fields


def machine() -> dict[str, object]:
    """The CPU, cores, torch threads and torch version: the columns every CSV row and table file carries.

    `cpu_id` adds vendor, family, model and stepping, because a virtual machine often names its CPU only
    "Intel(R) Xeon(R) Processor"; `cpu_capability` is the vector instruction set torch's kernels use.
    """
    info = _cpuinfo()
    cpu_id = " ".join(f"{key} {info[field]}" for key, field in
                      (("vendor", "vendor_id"), ("family", "cpu family"), ("model", "model"), ("stepping", "stepping"))
                      if field in info)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_id": cpu_id or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": usable,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def code_version(root: Path = ROOT) -> str:
    """The commit the measured code (this checkout, or another at `root`) is at, and whether the package or the
    scripts differ from it: a table is only reproducible from code someone can check out."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--", "hf_tensor_attn", "scripts")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git did not run)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return f"commit {head.stdout.strip()}" + (
        ", with uncommitted changes to hf_tensor_attn/ or scripts/" if changed.stdout.strip() else "")


def describe_machine(m: dict[str, object]) -> str:
    return (f"{m['cpu']} ({m['cpu_id']}; torch kernels: {m['cpu_capability']}), {m['cores']} cores, "
            f"torch {m['torch']}, torch threads: {m['threads']}")


def busy_fraction(seconds: float = 0.3) -> float | None:
    """Share of all cores busy while this process sleeps for `seconds`: the load of other processes."""
    if not HAVE_PROC:
        return None

    def sample():
        ticks = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


# The code version when this process took its first load snapshot, which every script does as its run starts:
# `run_record` runs at the end, and a checkout edited or committed meanwhile would otherwise be recorded as measured.
_code_at_start: str | None = None


def load_snapshot() -> dict[str, float | None]:
    """Other processes' load now: the busy share of the cores over 0.3 s and the 1-minute load average. The first
    call of a process also notes the code version (see `run_record`)."""
    global _code_at_start
    if _code_at_start is None:
        _code_at_start = code_version()
    return {"busy": busy_fraction(), "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def describe_load(before: dict, after: dict) -> str:
    def one(s):
        busy = "unknown" if s["busy"] is None else f"{s['busy']:.0%} of the cores busy"
        avg = "" if s["loadavg"] is None else f", 1-min load average {s['loadavg']:.2f}"
        return busy + avg

    return f"other processes: {one(before)} just before the run; {one(after)} just after"


def wait_for_idle(max_seconds: float, busy_below: float = 0.25) -> None:
    """Wait up to `max_seconds` for other processes to leave the cores (a shared machine)."""
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        busy = busy_fraction(0.5)
        if busy is None or busy < busy_below:
            return


# ---------------------------------------------------------------------------------------------------------------
# Time, GEMM rate, memory
# ---------------------------------------------------------------------------------------------------------------


def _ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process) from /proc."""
    ticks = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    own = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])  # utime + stime


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the best block (the least disturbed) and the median block of the clean measurements.
    `disturbed`: every measurement overlapped other processes' work, so both come from disturbed ones."""

    best: float
    median: float
    disturbed: bool


def measure(fn, *, repeats: int = 3, min_run_time: float = 0.2, wait_idle: float = 0.0) -> Timing:
    """Time `fn()` with `Timer.blocked_autorange`, `repeats` times, at the current torch thread count.

    Each measurement runs blocks of calls for at least `min_run_time` seconds (long enough for CPU-time ticks of
    10 ms to tell whether others took more than OTHERS_MAX_CORES of a core meanwhile). A disturbed one is retried
    after a pause for up to `wait_idle` seconds in all; after that the timing is kept and flagged.
    """
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    hz = os.sysconf("SC_CLK_TCK") if HAVE_PROC else 100
    clean, disturbed = [], []
    deadline = time.monotonic() + wait_idle
    while len(clean) < repeats:
        if HAVE_PROC:
            busy0, own0 = _ticks()
        start = time.perf_counter()
        blocks = timer.blocked_autorange(min_run_time=min_run_time).times
        elapsed = time.perf_counter() - start
        others = 0.0
        if HAVE_PROC:
            busy1, own1 = _ticks()
            others = ((busy1 - busy0) - (own1 - own0)) / hz / elapsed
        if others < OTHERS_MAX_CORES:
            clean.append(blocks)
            continue
        disturbed.append(blocks)
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)  # let the other job's burst pass
    times = [t for blocks in (clean or disturbed) for t in blocks]
    return Timing(best=min(times), median=statistics.median(times), disturbed=not clean)


def mm_gflops(sizes=(1024, 2048), *, repeats: int = 2, min_run_time: float = 0.2, wait_idle: float = 0.0) -> float:
    """This machine's practical fp32 GEMM peak now: the best `torch.mm` rate over square sizes, same threads."""
    rates = []
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        best = measure(lambda: torch.mm(a, b), repeats=repeats, min_run_time=min_run_time, wait_idle=wait_idle).best
        rates.append(2 * n**3 / best / 1e9)
    return max(rates)


def between_mm(fn, mm_sizes) -> tuple[object, float, float]:
    """One interleaved round: (fn(), the torch.mm rate just before it, just after it), short torch.mm timings so that a
    round takes seconds. A ratio to the mean of the two compares fn with torch.mm at the machine's speed of the
    moment."""
    before = mm_gflops(mm_sizes, repeats=1, min_run_time=0.05)
    result = fn()
    return result, before, mm_gflops(mm_sizes, repeats=1, min_run_time=0.05)


def read_gbps(n_bytes: int = 1 << 30, *, repeats: int = 2, min_run_time: float = 0.2) -> float:
    """This machine's streaming read rate now (GB/s): the best `torch.sum` over an fp32 tensor of `n_bytes`, larger
    than the caches, same threads."""
    x = torch.ones(n_bytes // 4)
    return n_bytes / measure(lambda: x.sum(), repeats=repeats, min_run_time=min_run_time).best / 1e9


_libc = ctypes.CDLL("libc.so.6") if os.path.exists("/proc/self/clear_refs") else None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_mib(fn) -> float | None:
    """Peak resident-set growth during one call of `fn`, in MiB; None where Linux's VmHWM reset is unavailable.
    Freed heap is returned to the OS first (malloc_trim), so the growth is what the call itself touched."""
    if _libc is None:
        return None
    gc.collect()
    _libc.malloc_trim(0)
    base = _status_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fn()
    return (_status_kb("VmHWM:") - base) / 1024


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def output_dir(parser: argparse.ArgumentParser, out: str | None, name: str, full: bool) -> Path:
    """The folder a run writes into. A full run defaults to docs/<name>/ (the committed results); a quick or
    partial run defaults to runs/bench/<name>/ and may not write anywhere under docs/, so that a smoke run never
    replaces published numbers."""
    path = Path(out) if out is not None else (DOCS / name if full else RUNS / name)
    if not full and path.resolve().is_relative_to(DOCS.resolve()):
        parser.error(f"--out {out}: a quick or partial run may not write under {DOCS} (the committed results); "
                     f"allowed: any folder outside it, default {RUNS / name}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_csv(path: Path, rows: list[dict], machine_record: dict) -> None:
    """One row per measurement, each followed by the machine's columns."""
    rows = [{**row, **machine_record} for row in rows]
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV this harness wrote, numbers parsed back (an empty cell stays '')."""

    def value(x: str):
        for cast in (int, float):
            try:
                return cast(x)
            except ValueError:
                pass
        return x

    with open(path, newline="") as f:
        return [{key: value(v) for key, v in row.items()} for row in csv.DictReader(f)]


def markdown_table(header: list[str], rows: list[list], align: str = "") -> list[str]:
    """Lines of a markdown table; `align` is one character per column, 'r' for right-aligned, anything else left."""
    rule = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "l")]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"] + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows
    ]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on a benchmark machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------------------------
# The run record and the rendered tables (the publishing convention, see the module docstring)
# ---------------------------------------------------------------------------------------------------------------

RUN_RECORD = "run.json"
TABLES = "tables.md"


# Environment variables that choose which build of the kernels a run measures (torch's and MKL's instruction set;
# the compiled loops follow torch's): part of the command when set.
BUILD_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def command_line(module: str, args: list[str] | None) -> str:
    """How the run was started, as one shell line (`args` None: this process's own arguments), with the variables of
    BUILD_ENV that were set."""
    args = sys.argv[1:] if args is None else args
    env = "".join(f"{name}={shlex.quote(os.environ[name])} " for name in BUILD_ENV if name in os.environ)
    return f"{env}python -m {module}" + "".join(" " + shlex.quote(a) for a in args)


def run_record(module: str, args: list[str] | None, title: str, machine_record: dict | None, load: str,
               **extra) -> dict:
    """What `render` needs besides the CSVs: the module (e.g. "scripts.bench.bench_cache"), the command, the code
    version, the machine (None: not recorded), the load around the run, the title, and any script-specific
    settings in `extra` (plain JSON values). The code version is the one at the run's start (`load_snapshot`) and,
    if the checkout changed during the run, the one at its end as well."""
    end = code_version()
    code = end if _code_at_start in (None, end) else f"{_code_at_start} at the start of the run; {end} at its end"
    return {"module": module, "command": command_line(module, args), "code": code, "machine": machine_record,
            "load": load, "title": title, **extra}


def write_run_record(folder: Path, record: dict) -> None:
    (Path(folder) / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def read_run_record(folder: Path) -> dict:
    return json.loads((Path(folder) / RUN_RECORD).read_text())


def render_document(record: dict, sections: list[tuple[str, list[str]]]) -> str:
    """The text of tables.md: title, command, code, machine and load from the run record, then each (heading, lines)
    section."""
    where = "not recorded" if record["machine"] is None else describe_machine(record["machine"])
    lines = [f"# {record['title']}", "", f"Command: `{record['command']}`", "", f"Code: {record['code']}.", "",
             f"Machine: {where}.", "", f"Load: {record['load']}.", ""]
    for heading, body in sections:
        lines += [f"## {heading}", "", *body, ""]
    return "\n".join(lines)


def ahead_from(points) -> object | None:
    """The first x of sorted (x, ahead) points from which `ahead` holds at every later point too (a crossover read
    from measurements, not from fitted curves); None when it does not hold at the last point."""
    points = list(points)
    return next((x for i, (x, _) in enumerate(points) if all(a for _, a in points[i:])), None)


def publish(folder: Path, render) -> str:
    """Write tables.md = render(folder) and return the text (the scripts also print it)."""
    text = render(Path(folder))
    (Path(folder) / TABLES).write_text(text)
    return text


def rebuild_or_start(args, name: str, render) -> list[dict] | None:
    """With --from-csv: rebuild tables.md in args.out and return the rows of its `name`.csv; otherwise set torch's
    thread count for the run and return None."""
    if args.from_csv:
        print(publish(args.out, render))
        return read_csv(args.out / f"{name}.csv")
    torch.set_num_threads(args.threads)
    return None


def render_folder(folder: Path) -> str:
    """tables.md as the script named in the folder's run record builds it from the folder's files."""
    module = importlib.import_module(read_run_record(folder)["module"])
    return module.render(Path(folder))
