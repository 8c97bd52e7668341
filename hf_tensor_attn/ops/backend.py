"""Which implementation runs an op: the CPU/eager torch path, or the Triton kernels (`ops.triton_kernels`).

`backend=None` (auto) takes Triton for CUDA tensors of a dtype the kernels support when the `triton` package
imports, and torch otherwise. "torch" always runs the torch path; "triton" insists on the kernels and says why
when they cannot run. The kernels also run on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1` set
before `ops.triton_kernels` is first imported); that is how the tests check them without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("torch", "triton")
# fp32 is computed exactly (IEEE dot products); float64 has no tensor-core path and stays on torch.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_backend(backend, name: str = "backend") -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"`{name}` must be None (automatic), 'torch' or 'triton', got {backend!r}")


@functools.cache
def triton_installed() -> bool:
    # Asked on every op call (every layer, every decode step): find_spec scans sys.path, so ask once per process.
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(backend, q: torch.Tensor) -> bool:
    """True when the op should run the Triton kernels (see the module docstring)."""
    check_backend(backend)
    if backend == "torch":
        return False
    if backend is None:
        return q.is_cuda and q.dtype in TRITON_DTYPES and triton_installed()
    if not triton_installed():
        raise ValueError("backend='triton' needs the `triton` package: pip install 'hf_tensor_attn[gpu]'")
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"backend='triton' supports dtypes {[str(d) for d in TRITON_DTYPES]}, got {q.dtype}")
    if not q.is_cuda and not _interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {q.device}), or TRITON_INTERPRET=1 to run the "
            "kernels on CPU in Triton's interpreter"
        )
    return True
