"""The compiled CPU tile loops (`csrc/tiles.cpp`): built ahead of time by `python -m hf_tensor_attn.build` or on first
use; the Python loops wherever they cannot be.

The tiled op's forward and backward loops run in C++ when this library loads: same tiles and GEMMs, the exp pass
and the small per-row steps as loops on torch's threads, no interpreter between them (`docs/bench_attention.md` measures
both). Building it needs a C++ compiler and ninja (`torch.utils.cpp_extension`) and takes 15 s to a minute, once per
torch version, source and CPU kind: one log line names the folder before it starts. The result is kept under
TORCH_EXTENSIONS_DIR (by default ~/.cache/torch_extensions). Where it cannot be built or loaded, one warning says why
and the Python loops run; `HF_TENSOR_ATTN_CPU_EXTENSION=0` skips the attempt.

The cache looks after itself:
- the build runs in a child process (with the `ninja` package's folder on that process's PATH only), under a lock
  (`fcntl.flock` on `hf_tensor_attn.lock` in the build folder) that the system releases when its holders die: a lock
  left by a killed build is never waited on, and torch's own lock file, found while holding ours, is a killed build's
  and is removed;
- a library is loaded only once it is known to load: right after its build, or in a child process, where a truncated
  or garbage file fails (a truncated library crashes whatever process maps it). A `.check` file beside the library
  records the SHA-256 of the file that loaded, so later processes load it at once; a library that fails is rebuilt
  with one warning, or skipped where its folder cannot be written (a read-only cache with a valid library is used);
- the build reads a copy of the source in its own folder, so two checkouts of one version share one build instead of
  rebuilding each other's (the library's name hashes the source and the flags).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import torch

ENV = "HF_TENSOR_ATTN_CPU_EXTENSION"
SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "tiles.cpp"
LOCK_NAME = "hf_tensor_attn.lock"
BUILD_TIMEOUT_S = 1800  # a build that never ends (a stuck compiler) is an error, not a hang
TYPICAL_BUILD = "15 s to a minute"
logger = logging.getLogger(__name__)


def enabled() -> bool:
    """Whether the compiled loop may be used (the environment variable, read on every call so tests can switch)."""
    value = os.environ.get(ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 (Python loop only) or 1 (compiled loop where it builds), got {value!r}")
    return value == "1"


def library_name(openmp: bool = True) -> str:
    # torch's build cache keys on the name and rebuilds in place when the source changes, not when torch does or the
    # flags do: a library built against another torch would load and fail at its first call, and two checkouts with
    # different sources would rebuild each other's library. The torch version and a hash of the source and the
    # flags in the name give each its own build; the flags that differ between machines (instruction set, OpenMP)
    # are spelt out too.
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(compile_flags(openmp)).encode()).hexdigest()[:10]
    version = re.sub(r"\W", "_", torch.__version__)
    capability = re.sub(r"\W", "_", _capability()).lower()  # e.g. "avx512"; some are two words ("Z VECTOR")
    return f"hf_tensor_attn_cpu_{version}_{digest}_{capability}" + ("_omp" if openmp else "")


# The loops of tiles.cpp are plain C++ that the compiler vectorises: built for the vector instructions torch's own
# kernels use on this CPU (ATen chooses among its builds at run time; a build on first use can target the one it
# runs on). Without these flags x86-64 compilers use SSE2 only, a quarter of an AVX-512 register.
# -fno-trapping-math where the instruction set has no masked operations: the exp passes clamp before they compute,
# and under GCC's default (floating-point operations may trap) those branches keep it from vectorising the
# backward's pass and the forward's masked rows (tests/ops/test_extension.py reads GCC's report); an AVX2 build then
# ran its backward slower than the Python loops. Nothing here reads floating-point exception flags, and results,
# NaN and inf included, are the same. AVX-512's masked operations vectorise those loops either way, and its builds
# (the ones docs/ measures) keep the default.
NO_MASKS_FLAGS = ["-fno-trapping-math"]
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", *NO_MASKS_FLAGS],
}


def _capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def compile_flags(openmp: bool = True) -> list[str]:
    # -fopenmp at compile time only: the library is not linked to an OpenMP runtime of its own, so its parallel
    # loops (at::parallel_for) call the one torch has loaded and share torch's threads; a second runtime would bring
    # a second pool of threads to the same cores.
    return ["-O3", *CAPABILITY_FLAGS.get(_capability(), NO_MASKS_FLAGS), *(["-fopenmp"] if openmp else [])]


def _openmp_choices() -> tuple[bool, ...]:
    return (True, False) if torch.backends.openmp.is_available() else (False,)


def build(rebuild: bool = False):
    """Finds (or builds) and loads the library: torch.ops.hf_tensor_attn_cpu, or None with a RuntimeWarning saying
    why not. `rebuild` builds it anew even where a checked library is cached.

    First with OpenMP where torch uses it; where that fails (a compiler without OpenMP, or clang's, whose calls
    torch's GNU runtime does not provide), once more without: the same loops on one thread."""
    if not SOURCE.is_file():  # a self-contained checkpoint's copy of this code carries no C++ (hf_tensor_attn.remote_code)
        logger.info("hf_tensor_attn: %s is not here; the tiled op runs its Python loops", SOURCE)
        _state.update(library=None, flags=[], failure=f"{SOURCE} is not here")
        return None
    errors = []
    for openmp in _openmp_choices():
        try:
            path = _checked_library(openmp, rebuild)
            torch.ops.load_library(str(path))
        except Exception as error:  # no compiler, no ninja, a failed build: the Python loops give the same results
            errors.append(error)
            continue
        _state.update(library=str(path), flags=compile_flags(openmp), failure=None)
        if errors:
            logger.warning("hf_tensor_attn: the compiled CPU tile loops built without OpenMP, their own loops run "
                           "on one thread (with OpenMP: %s)", _reason(str(errors[0])))
        return torch.ops.hf_tensor_attn_cpu
    reasons = list(dict.fromkeys(f"{type(error).__name__}: {_reason(str(error))}" for error in errors))
    _state.update(library=None, flags=[], failure="; without OpenMP: ".join(reasons))
    warnings.warn(
        f"hf_tensor_attn: could not build or load the compiled CPU tile loops ({_state['failure']}); the tiled op "
        f"runs its Python loops (same results, slower). Set {ENV}=0 to skip the attempt.",
        RuntimeWarning, stacklevel=4,  # the caller of tensor_attention
    )
    return None


def _library_path(openmp: bool) -> Path:
    """Where torch's build puts the library (creating the folder, as torch does)."""
    from torch.utils import cpp_extension

    name = library_name(openmp)
    return Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"


def _checked_library(openmp: bool, rebuild: bool) -> Path:
    """The path of a library that loads, built here if it is missing or fails to load; raises where none can be."""
    path = _library_path(openmp)
    problem = None if rebuild else _problem(path)
    if problem is None and not rebuild:
        return path
    try:
        with _build_lock(path.parent) as lock:
            if not rebuild:
                problem = _problem(path)  # another process may have built it while this one waited
                if problem is None:
                    return path
                record = _record(path)
                if record is not None and record["error"]:
                    # Built here and failed to load (e.g. OpenMP calls that torch's runtime lacks): a build gives the
                    # same again; `python -m hf_tensor_attn.build --rebuild` tries anew.
                    raise RuntimeError(f"{path} was built here but does not load: {record['error']}")
            _build(path, openmp, problem, lock)
    except _Unwritable as error:
        raise RuntimeError(f"{path} {'cannot be used (' + problem + ')' if problem else 'is not built'} and {error}")
    return path


def _build(path: Path, openmp: bool, problem: str | None, lock: int) -> None:
    if problem:
        logger.warning("hf_tensor_attn: the cached compiled CPU tile loops cannot be used (%s); rebuilding them in %s "
                       "(usually %s)", problem, path.parent, TYPICAL_BUILD)
    else:
        logger.warning("hf_tensor_attn: building the compiled CPU tile loops in %s (usually %s; once per torch "
                       "version, source and CPU kind)", path.parent, TYPICAL_BUILD)
    _clear(path)
    try:
        _compile(path, compile_flags(openmp), lock)
    except Exception as error:
        if path.exists():  # linked, then failed to load in the build's process
            _write_record(path, error=_reason(str(error)) or type(error).__name__)
        raise
    _write_record(path, error=None)


def _problem(path: Path) -> str | None:
    """None where the library at path loads, else why not ("" where there is none yet). A library checked before
    (its SHA-256 recorded beside it) is not loaded again to check."""
    if not path.exists():
        return ""
    record = _record(path)
    if record is not None:
        return record["error"] or None
    problem = _load_problem(path)
    if problem is None:
        with contextlib.suppress(OSError):  # a read-only cache: checked again by the next process
            _write_record(path, error=None)
    return problem


def _record(path: Path) -> dict | None:
    """What the `.check` file says about this very file (None where there is none or the file has changed since)."""
    try:
        record = json.loads(Path(f"{path}.check").read_text())
        return record if record["sha256"] == _sha256(path) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_record(path: Path, error: str | None) -> None:
    check = Path(f"{path}.check")
    staged = check.with_name(f"{check.name}.{os.getpid()}")
    staged.write_text(json.dumps({"sha256": _sha256(path), "error": error}))
    os.replace(staged, check)  # whole or absent: a reader never sees half a record


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_LOAD = """
import sys, torch
try:
    torch.ops.load_library(sys.argv[1])
except Exception as error:  # torch's message names the file; the loader's, its cause, says what is wrong with it
    cause = error.__cause__ or error
    sys.exit(f"{type(cause).__name__}: {cause}")
"""


def _load_problem(path: Path) -> str | None:
    """Loads the library in a child process: None where that works, else why not."""
    try:
        done = subprocess.run([sys.executable, "-c", _LOAD, str(path)], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "loading it in a new process did not finish in 300 s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return f"loading it in a new process ended with {signal.Signals(-done.returncode).name}"
    lines = done.stderr.strip().splitlines()
    return f"loading it in a new process failed: {lines[-1] if lines else f'exit status {done.returncode}'}"


class _Unwritable(Exception):
    pass


@contextlib.contextmanager
def _build_lock(folder: Path):
    """Holds the build lock of a folder; yields its file descriptor, which the build's child process inherits so that
    an orphaned build keeps the lock until it ends. The system drops an flock with the last descriptor of its holders,
    so a killed build leaves nothing to wait on."""
    import fcntl

    try:
        handle = open(folder / LOCK_NAME, "a")
    except OSError as error:
        raise _Unwritable(f"its folder cannot be written ({error})") from error
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("hf_tensor_attn: waiting for another process building the compiled CPU tile loops in %s",
                           folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield handle.fileno()


def _clear(path: Path) -> None:
    """Removes what a failed or killed build may have left: torch's lock file (no builder of ours holds it while we
    hold our lock; torch would wait on it forever), the library, its record and the objects (maybe cut short)."""
    stale = path.parent / "lock"
    if stale.exists():
        logger.warning("hf_tensor_attn: removing %s, left by a build that was killed", stale)
    for leftover in (stale, path, Path(f"{path}.check"), *path.parent.glob("*.o")):
        leftover.unlink(missing_ok=True)


_BUILD = """
import json, signal, sys
from torch.utils import cpp_extension
name, source, flags, folder, timeout = json.loads(sys.argv[1])
signal.alarm(timeout)  # also where the process that started it is gone: an orphan keeps the lock only so long
try:
    cpp_extension.load(name=name, sources=[source], extra_cflags=flags, build_directory=folder, is_python_module=False)
except Exception as error:
    sys.exit(f"{type(error).__name__}: {error}")
"""


def _compile(path: Path, flags: list[str], lock: int) -> None:
    """Builds and loads the library in a child process (which loads it, so a library that cannot load fails here)."""
    source = path.parent / SOURCE.name  # the same path from every checkout: ninja's build file is the same too
    shutil.copyfile(SOURCE, source)
    env = dict(os.environ)
    ninja_dir = _ninja_dir()
    if ninja_dir:
        env["PATH"] = os.pathsep.join(filter(None, [ninja_dir, env.get("PATH")]))
    name = path.name.removesuffix(".so")
    arguments = json.dumps([name, str(source), flags, str(path.parent), BUILD_TIMEOUT_S])
    command = [sys.executable, "-c", _BUILD, arguments]
    done = subprocess.run(command, env=env, pass_fds=(lock,), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        if done.returncode < 0:
            raise RuntimeError(f"the build process ended with {signal.Signals(-done.returncode).name}")
        raise RuntimeError(done.stderr.strip() or f"the build process exited with status {done.returncode}")


def _ninja_dir() -> str | None:
    """The folder of the `ninja` package's binary: torch runs `ninja` from PATH, where the package's binary is only
    when its environment is activated. None without the package (a system ninja on PATH may still do)."""
    try:
        import ninja
    except ImportError:
        return None
    return getattr(ninja, "BIN_DIR", None) or None


def _reason(message: str) -> str:
    """The lines of a failed build that say why: torch's message repeats the compile commands and ninja's summary
    around the compiler's own output."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) == 1:  # a message of ours, not a build log
        return lines[0]
    said = [line for line in lines[1:] if not line.startswith(("FAILED", "ninja:", "[")) and " -c " not in line]
    errors = [line for line in said if "error" in line.lower()]
    return "; ".join(errors[:2] or said[-2:] or lines[:1])[:400]


def build_flags() -> list[str]:
    """The compiler flags of the loaded library (empty before a build or where none loaded), for benchmark records."""
    return list(_state["flags"])


def describe() -> dict:
    """What this process knows about the compiled loops, for `python -m hf_tensor_attn.env`; builds nothing.

    enabled (the switch, or its error), built (a checked library for this machine's flags is in the cache), loaded,
    library (the loaded one, else where the OpenMP build goes), capability and flags (of the loaded library, else
    those a build would use), l2_bytes and l2_source (what the tile planner uses, and from where), failure (why this
    process runs the Python loops, where it tried)."""
    from .exact.tiles import l2_size

    try:
        switch = enabled()
    except ValueError as error:
        switch = str(error)
    openmp = _openmp_choices()[0]
    try:
        path = Path(_state["library"]) if _state["library"] else _library_path(openmp)
        record = _record(path)
        built = record is not None and record["error"] is None
    except OSError as error:
        path, built = None, f"cannot tell: {error}"
    try:
        l2, l2_source = l2_size()
    except ValueError as error:
        l2, l2_source = None, str(error)
    return {
        "enabled": switch,
        "built": built,
        "loaded": _state["library"] is not None,
        "library": None if path is None else str(path),
        "capability": _capability(),
        "flags": build_flags() or compile_flags(openmp),
        "l2_bytes": l2,
        "l2_source": l2_source,
        "failure": _state["failure"],
    }


def cpu_ops():
    """torch.ops.hf_tensor_attn_cpu, or None when switched off or when it cannot be built."""
    return _loaded() if enabled() else None


# What this process loaded: the library is loaded into the process once (torch.ops registers its namespace once), so
# this is process state by nature.
_state: dict = {"library": None, "flags": [], "failure": None}
_lock = threading.Lock()
_attempt: list = []  # the result of this process's one attempt


def _loaded():
    if _attempt:  # every call after the first: no lock on the op's path
        return _attempt[0]
    with _lock:  # threads calling the op at once: one build, one warning
        if not _attempt:
            _attempt.append(build())
        return _attempt[0]
