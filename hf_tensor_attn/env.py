"""`python -m hf_tensor_attn.env`: what this machine runs, for bug reports (as `transformers env` or `ds_report`).

Prints the versions, the CPU capability, the state of the compiled CPU loops, and for each op which implementation
the attention door (`ops.dispatch`) picks here, with the Triton kernels' self-check result where they would run.
"""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from .ops import backend, dispatch, extension


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report(device: str | None = None) -> dict[str, object]:
    """The facts `main` prints, as a dict. `device`: where to ask about implementations (default: cuda if
    available, else cpu)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    facts: dict[str, object] = {
        "hf_tensor_attn": _version("hf_tensor_attn"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "cpu capability (torch)": torch.backends.cpu.get_cpu_capability(),
        "torch threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "not available",
    }
    problem = backend.triton_release_problem()
    facts["triton release"] = "tested" if problem is None else f"{problem[0]}: {problem[1]}"
    facts.update({f"cpu loops: {k}": v for k, v in _extension_facts().items()})
    for dtype in (torch.float32, torch.bfloat16) if device == "cpu" else (torch.float32, torch.bfloat16, torch.float16):
        q = torch.zeros(1, 1, 2, 64, dtype=dtype, device=device)
        for name, one_query, needs_grad in (("training", False, True), ("prefill", False, False),
                                            ("decode step", True, False)):
            try:
                impl = dispatch.implementation(None, q, one_query=one_query, needs_grad=needs_grad)
            except Exception as e:  # the report must print whatever is broken
                impl = f"error: {type(e).__name__}: {e}"
            facts[f"{name} ({device}, {str(dtype).removeprefix('torch.')})"] = impl
    checks = dispatch.self_check_results()
    facts["triton self-checks"] = ({f"{k[0]} {k[1]} d={k[2]} {k[3]}": v or "passed" for k, v in checks.items()}
                                   or "none ran (they run at the first automatic Triton call per kernel)")
    return facts


def _extension_facts() -> dict[str, object]:
    describe = getattr(extension, "describe", None)
    if describe is not None:
        return describe()
    return {"enabled": extension.enabled()}


def main() -> None:
    for key, value in report().items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"    {k}: {v}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
