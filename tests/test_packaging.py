"""The installable package (issue 34): `python -m build` makes an sdist and, from it, a wheel that carry every file
of the package, with metadata `twine check` accepts; the wheel installed into a fresh virtual environment generates
from outside the checkout."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "hf_tensor_attn"

GENERATE = """
import pathlib, sys
import hf_tensor_attn
from hf_tensor_attn.ops import extension
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
location = pathlib.Path(hf_tensor_attn.__file__).resolve()
assert location.is_relative_to(pathlib.Path(sys.prefix).resolve()), location  # the wheel's copy, not the checkout
assert extension.SOURCE.is_file(), extension.SOURCE  # the C++ source travels with the wheel
config = AutoConfig.for_model("tensor_attn", hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
model = AutoModelForCausalLM.from_config(config).eval()
tok = hf_tensor_attn.TensorAttnByteTokenizerFast()
out = model.generate(**tok(["3 14 "], return_tensors="pt"), max_new_tokens=4, do_sample=False,
                     cache_implementation="two_cache")
print(out.shape[1])
"""


def run(*command, **options):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **options)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def package_files() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / PACKAGE).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """sdist and wheel, built from a copy of the sources (the build's egg-info and build/ stay out of the checkout);
    without isolation, so nothing is downloaded."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / PACKAGE, source / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source))
    return out


def test_the_sdist_and_wheel_carry_every_package_file_and_full_metadata(dist):
    wheel, = dist.glob("*.whl")
    sdist, = dist.glob("*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert package_files() <= names, sorted(package_files() - names)
    assert f"{PACKAGE}/csrc/tiles.cpp" in names
    metadata_name, = [n for n in names if n.endswith(".dist-info/METADATA")]
    metadata = email.message_from_bytes(zipfile.ZipFile(wheel).read(metadata_name))
    assert metadata["License-Expression"] == "Apache-2.0"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert metadata["Description-Content-Type"] == "text/markdown" and "tensor" in metadata.get_payload().lower()
    assert any("Artificial Intelligence" in c for c in metadata.get_all("Classifier"))
    assert metadata["Requires-Python"] and metadata.get_all("Requires-Dist")
    check = run(sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist))
    assert check.stdout.count("PASSED") == 2, check.stdout


def test_the_wheel_installs_into_a_fresh_venv_and_generates(dist, tmp_path):
    wheel, = dist.glob("*.whl")
    venv = tmp_path / "venv"
    # The system packages give torch and transformers; the package itself comes only from the wheel.
    run(sys.executable, "-m", "venv", "--system-site-packages", str(venv))
    python = venv / "bin" / "python"
    run(str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_TENSOR_ATTN_CPU_EXTENSION"] = "0"  # building it is tested elsewhere and takes 15 s
    out = run(str(python), "-c", GENERATE, cwd=tmp_path, env=env)
    assert out.stdout.strip().splitlines()[-1] == "9", out.stdout  # 5 prompt tokens + 4 new ones
