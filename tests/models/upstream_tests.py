"""transformers' own common model tests (`tests/test_modeling_common.py`, `test_configuration_common.py`,
`test_training_mixin.py`) from the source distribution of the installed transformers, fetched at test time.

The project carries no copy of transformers' test code: `load()` downloads the sdist once with pip (PyPI, the one
registry CI reaches) into a cache folder and imports its top-level `tests/` folder as the package
`transformers_upstream_tests`. The sdist lacks three modules that `test_modeling_common.py` and
`test_configuration_common.py` import; they are supplied here, each saying what it stands for:
- `generation/test_utils.py` (GenerationTesterMixin): `generation_mixin` is the class put in its place, the
  caller's own generate checks (tests/models/test_transformers_common.py);
- `exporters/test_export.py` (ExportTesterMixin, a base of ModelTesterMixin): an empty mixin, so the export tests
  do not run (torch.export of the model is not part of these tests);
- `utils/test_configuration_utils.py` (`config_common_kwargs`: values of `PreTrainedConfig`'s own fields that
  `ConfigTester` checks every config keeps): `CONFIG_COMMON_KWARGS` below, values chosen here.

Environment: HF_TENSOR_ATTN_UPSTREAM_TESTS names the cache folder (default ~/.cache/hf_tensor_attn/upstream-tests).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers

PACKAGE = "transformers_upstream_tests"
MODULES = ("test_modeling_common", "test_configuration_common", "test_training_mixin")

# Fields of PreTrainedConfig itself, each set to a value other than its default.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "tie_word_embeddings": False,
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}


class UpstreamTestsUnavailable(RuntimeError):
    """The sdist could not be fetched or lacks what the tests import; the message says why."""


def cache_root() -> Path:
    default = Path.home() / ".cache" / "hf_tensor_attn" / "upstream-tests"
    return Path(os.environ.get("HF_TENSOR_ATTN_UPSTREAM_TESTS", default))


def fetch(version: str = transformers.__version__, root: Path | None = None) -> Path:
    """The folder holding transformers `version`'s top-level tests/*.py, downloaded on first use."""
    root = cache_root() if root is None else root
    target = root / f"transformers-{version}" / "tests"
    if all((target / f"{name}.py").is_file() for name in (*MODULES, "__init__")):
        return target
    try:
        return _download(version, root, target)
    except OSError as error:  # an unwritable cache folder, a full disk, a truncated archive
        raise UpstreamTestsUnavailable(f"could not unpack transformers {version}'s tests into {root}: {error}") from error


def _download(version: str, root: Path, target: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                   f"transformers=={version}", "-d", scratch]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired as error:
            raise UpstreamTestsUnavailable(f"`{' '.join(command)}` did not finish: {error}") from error
        archives = list(Path(scratch).glob("transformers-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise UpstreamTestsUnavailable(
                f"`{' '.join(command)}` failed (exit {done.returncode}): {done.stderr.strip()[-500:]}"
            )
        staged = Path(scratch) / "tests"
        staged.mkdir()
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                name = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                # Only the top-level test modules: the sdist's tests/ has nothing else.
                if member.isfile() and name.endswith(".py") and "/" not in name:
                    (staged / name).write_bytes(archive.extractfile(member).read())
        # test_configuration_common.py runs `direct_transformers_import(its folder)`, which executes the folder's
        # __init__.py; in transformers' repository that is an empty file, which the sdist leaves out.
        (staged / "__init__.py").write_text("")
        missing = [name for name in MODULES if not (staged / f"{name}.py").is_file()]
        if missing:
            raise UpstreamTestsUnavailable(f"the transformers {version} sdist has no tests/{missing[0]}.py")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        staged.rename(target)  # whole or not at all: a later run never sees half a folder
    return target


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def load(generation_mixin: type) -> dict[str, types.ModuleType]:
    """Import the upstream test modules ({name: module}); `generation_mixin` stands in for GenerationTesterMixin."""
    if PACKAGE in sys.modules:
        return {name: sys.modules[f"{PACKAGE}.{name}"] for name in MODULES}
    folder = fetch()

    class ExportTesterMixin:
        """Stands in for transformers' tests/exporters/test_export.py (not in the sdist): no export tests."""

    package = _module(PACKAGE, __path__=[str(folder)])
    for sub, attributes in {
        "generation": {}, "generation.test_utils": {"GenerationTesterMixin": generation_mixin},
        "exporters": {}, "exporters.test_export": {"ExportTesterMixin": ExportTesterMixin},
        "utils": {}, "utils.test_configuration_utils": {"config_common_kwargs": CONFIG_COMMON_KWARGS},
    }.items():
        _module(f"{PACKAGE}.{sub}", **({"__path__": []} if "." not in sub else {}), **attributes)
    modules = {}
    for name in MODULES:
        spec = importlib.util.spec_from_file_location(f"{PACKAGE}.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(package, name, module)
        modules[name] = module
    return modules
