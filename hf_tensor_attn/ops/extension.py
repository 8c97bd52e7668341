"""The compiled CPU tile loop (`csrc/tiles.cpp`), built on first use; the Python loop wherever it cannot be.

The tiled forward's loop runs the same ATen ops in C++ when this extension loads: same tiles, same GEMMs, no
interpreter between them (`docs/bench_attention.md` measures both). Building it takes about a minute once per
machine and torch version (`torch.utils.cpp_extension`: a C++ compiler and ninja; the result is cached under
TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions). Where it cannot be built, one warning says why and the
Python loop runs; `HF_TENSOR_ATTN_CPU_EXTENSION=0` skips the attempt.
"""

from __future__ import annotations

import functools
import logging
import os
import re
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


def library_name() -> str:
    # torch's build cache keys on the sources and flags, not on torch's version: a library built against another
    # torch would load and fail at its first call. The version in the name gives each torch its own build.
    return "hf_tensor_attn_cpu_" + re.sub(r"\W", "_", torch.__version__)


def build():
    """Builds (or finds in torch's cache) and loads the library: torch.ops.hf_tensor_attn_cpu, or None with a
    RuntimeWarning saying why not."""
    from torch.utils import cpp_extension

    start = time.perf_counter()
    path = os.environ.get("PATH", "")
    try:
        # torch runs `ninja` from PATH; the pip package's binary is not there unless its environment is activated
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
        cpp_extension.load(name=library_name(), sources=[str(SOURCE)], extra_cflags=["-O3"], is_python_module=False)
    except Exception as error:  # no compiler, no ninja, a failed build: the Python loop gives the same results
        reason = _reason(str(error))
        warnings.warn(
            f"hf_tensor_attn: could not build the compiled CPU tile loop ({type(error).__name__}: {reason}); the "
            f"tiled op runs its Python loop (same results, slower). Set {ENV}=0 to skip the attempt.",
            RuntimeWarning, stacklevel=2,
        )
        return None
    finally:
        os.environ["PATH"] = path
    seconds = time.perf_counter() - start
    if seconds > 5:
        logger.warning("hf_tensor_attn: built the compiled CPU tile loop in %.0f s (once; cached by torch under "
                       "TORCH_EXTENSIONS_DIR)", seconds)
    return torch.ops.hf_tensor_attn_cpu


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


_loaded = functools.cache(build)  # one attempt per process
