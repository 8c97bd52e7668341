"""Which triton releases the Triton kernels (`ops.exact.triton_kernels`) run with; `ops.dispatch.use_triton` asks
here.

`backend=None` (auto) takes Triton for CUDA tensors of a dtype the kernels support when a `triton` release the
kernels are tested with (TRITON_OLDEST_TESTED or newer) is installed, and torch otherwise. "torch" always runs the
torch path; "triton" insists on the kernels and says why when they cannot run. The kernels also run on CPU tensors
under Triton's interpreter (`TRITON_INTERPRET=1` set before `ops.exact.triton_kernels` is first imported); that is
how the tests check them without a GPU.

Which triton a GPU user has is usually not theirs to choose: each CUDA build of torch requires one release (torch
2.11 -> triton 3.6.0, 2.12 -> 3.7.0, 2.13 -> 3.7.1, 2.14 -> 3.8). So the kernels are tested with two
(.ci/run): TRITON_NEWEST_TESTED, pinned in configs/constraints.txt because torch==2.13.0 requires it, and
TRITON_OLDEST_TESTED in the environment of the oldest supported versions. An older triton (torch 2.4 to 2.10)
leaves CUDA tensors on the torch path, with one warning saying why; a newer one runs the kernels, with one
warning that they were not tested there. The kernels' tiles (`triton_kernels.TILES`) are chosen to compile without
register spills with both and with the newer 3.8.0 and 3.9.0 (docs/triton_resources.md).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import warnings

import torch
from packaging.version import Version


TRITON_OLDEST_TESTED = "3.6.0"
TRITON_NEWEST_TESTED = "3.7.1"
# fp32 is computed exactly (IEEE dot products); float64 has no tensor-core path and stays on torch.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_installed() -> bool:
    # Asked on every op call (every layer, every decode step): find_spec scans sys.path, so ask once per process.
    if importlib.util.find_spec("triton") is None:
        return False
    # The kernels' module is absent from a self-contained checkpoint's copy of this code (hf_tensor_attn.remote_code),
    # and so is their sub-package (the copy's modules are flat files): find_spec raises for a missing parent.
    try:
        return importlib.util.find_spec(f"{__package__}.exact.triton_kernels") is not None
    except ModuleNotFoundError:
        return False


class UntestedTritonWarning(UserWarning):
    """The installed triton is newer than the newest release the kernels were tested with."""


@functools.cache
def triton_version() -> Version | None:
    """The installed triton's release (None: not installed)."""
    if not triton_installed():
        return None
    try:
        return Version(importlib.metadata.version("triton"))
    except importlib.metadata.PackageNotFoundError:  # installed under another distribution name (pytorch-triton)
        import triton

        return Version(triton.__version__)


@functools.cache  # asked on every op call with CUDA tensors (every layer, every decode step)
def triton_release_problem() -> tuple[str, str] | None:
    """("too old" or "untested", why) for an installed triton outside TRITON_OLDEST_TESTED .. the minor release
    of TRITON_NEWEST_TESTED (patch releases are trusted); None inside it or when triton is not installed."""
    installed = triton_version()
    if installed is None:
        return None
    if installed.release < Version(TRITON_OLDEST_TESTED).release:
        return "too old", (
            f"the installed triton {installed} is older than {TRITON_OLDEST_TESTED}, the oldest release the kernels "
            f"are tested with (a CUDA build of torch >= 2.11 brings one; or pip install 'triton>={TRITON_OLDEST_TESTED}')")
    if installed.release[:2] > Version(TRITON_NEWEST_TESTED).release[:2]:
        return "untested", (
            f"hf_tensor_attn's Triton kernels were tested with triton {TRITON_OLDEST_TESTED} to "
            f"{TRITON_NEWEST_TESTED}; the installed triton {installed} is newer. If they fail to compile or disagree "
            "with backend='torch', please report it; backend='torch' avoids them.")
    return None


@functools.cache
def _warn_once(category: type[Warning], message: str) -> None:
    warnings.warn(message, category, stacklevel=4)


def check_triton_version(backend) -> bool:
    """Whether the installed triton may run the kernels: a too old one gives False with one warning (auto: CUDA
    tensors run torch) or a ValueError (backend="triton"); a newer one gives True with one warning."""
    problem = triton_release_problem()
    if problem is None:
        return True
    kind, why = problem
    if kind == "untested":
        _warn_once(UntestedTritonWarning, why)
        return True
    if backend == "triton":
        raise ValueError(f"backend='triton': {why}")
    _warn_once(RuntimeWarning, f"hf_tensor_attn: CUDA tensors run the torch path: {why}")
    return False
