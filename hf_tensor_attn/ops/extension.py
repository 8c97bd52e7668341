"""The compiled CPU tile loops (`csrc/tiles.cpp`), built on first use; the Python loops wherever they cannot be.

The tiled op's forward and backward loops run in C++ when this library loads: same tiles and GEMMs, the exp pass
and the small per-row steps as loops on torch's threads, no interpreter between them (`docs/bench_attention.md` measures
both). Building it takes about 15 s on a 2-core VM, once per machine, torch version, source and CPU kind
(`torch.utils.cpp_extension`: a C++ compiler and ninja; the
result is cached under TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions; point it elsewhere where that
is read-only). Where it cannot be built or loaded, one warning says why and the Python loops run;
`HF_TENSOR_ATTN_CPU_EXTENSION=0` skips the attempt. torch's build lock is a file in the cache: a build killed
outright leaves it behind, and later builds wait on it until it is deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import warnings
from pathlib import Path

import torch

ENV = "HF_TENSOR_ATTN_CPU_EXTENSION"
SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "tiles.cpp"
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


def build():
    """Builds (or finds in torch's cache) and loads the library: torch.ops.hf_tensor_attn_cpu, or None with a
    RuntimeWarning saying why not.

    First with OpenMP where torch uses it; where that fails (a compiler without OpenMP, or clang's, whose calls
    torch's GNU runtime does not provide), once more without: the same loops on one thread."""
    from torch.utils import cpp_extension

    if not SOURCE.is_file():  # a self-contained checkpoint's copy of this code carries no C++ (hf_tensor_attn.remote_code)
        logger.info("hf_tensor_attn: %s is not here; the tiled op runs its Python loops", SOURCE)
        return None
    start = time.perf_counter()
    path = os.environ.get("PATH")
    errors = []
    try:
        os.environ["PATH"] = os.pathsep.join(filter(None, [_ninja_dir(), path]))
        for openmp in (True, False) if torch.backends.openmp.is_available() else (False,):
            try:
                cpp_extension.load(name=library_name(openmp), sources=[str(SOURCE)],
                                   extra_cflags=compile_flags(openmp), is_python_module=False)
            except Exception as error:  # no compiler, no ninja, a failed build: the Python loops give the same results
                errors.append(error)
                continue
            _built_with[:] = compile_flags(openmp)
            if errors:
                logger.warning("hf_tensor_attn: the compiled CPU tile loops built without OpenMP, their own loops run "
                               "on one thread (with OpenMP: %s)", _reason(str(errors[0])))
            break
        else:
            error = errors[-1]
            warnings.warn(
                f"hf_tensor_attn: could not build or load the compiled CPU tile loops ({type(error).__name__}: "
                f"{_reason(str(error))}); the tiled op runs its Python loops (same results, slower). Set {ENV}=0 to "
                "skip the attempt.",
                RuntimeWarning, stacklevel=4,  # the caller of tensor_attention
            )
            return None
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path
    seconds = time.perf_counter() - start
    if seconds > 5:
        logger.warning("hf_tensor_attn: built the compiled CPU tile loops in %.0f s (once; cached by torch under "
                       "TORCH_EXTENSIONS_DIR)", seconds)
    return torch.ops.hf_tensor_attn_cpu


_built_with: list[str] = []  # the compiler flags of the library this process loaded


def build_flags() -> list[str]:
    """The compiler flags of the loaded library (empty before a build or where none loaded), for benchmark records."""
    return list(_built_with)


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
    said = [line for line in lines[1:] if not line.startswith(("FAILED", "ninja:", "[")) and " -c " not in line]
    errors = [line for line in said if "error" in line.lower()]
    return "; ".join(errors[:2] or said[-2:] or lines[:1])[:400]


def cpu_ops():
    """torch.ops.hf_tensor_attn_cpu, or None when switched off or when it cannot be built."""
    return _loaded() if enabled() else None


_lock = threading.Lock()
_attempt: list = []  # the result of this process's one attempt


def _loaded():
    if _attempt:  # every call after the first: no lock on the op's path
        return _attempt[0]
    with _lock:  # threads calling the op at once: one build, one warning
        if not _attempt:
            _attempt.append(build())
        return _attempt[0]
