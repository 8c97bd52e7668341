"""Self-contained checkpoints: `save_pretrained(..., self_contained=True)` writes the package's code beside the
weights, so that `trust_remote_code=True` loads the checkpoint where only torch and transformers are installed.

transformers' remote-code loader (`transformers.dynamic_module_utils`, compat item 5) copies the module that
`auto_map` names plus the sibling files it imports as `from .NAME import ...`, and refuses a module whose absolute
imports are not installed. So each module of the package that the auto_map classes reach is written as one flat file,
`hf_tensor_attn__ops__exact__tiled.py` for `hf_tensor_attn.ops.exact.tiled` (a package's `__init__` as
`hf_tensor_attn__ops__exact.py`), with its relative imports rewritten to those flat names; nothing else in it
changes. Which modules, and their names, are read from the package's files and imports at save time. A module that
imports a package such an environment may lack (the Triton kernels need `triton`) is left out: its lazy imports
raise a `ModuleNotFoundError` that says so, and `ops.backend` then keeps CUDA tensors on the torch path. The
compiled CPU loops are not shipped either (`csrc/` is not Python); the Python loops run instead.

A model loaded from such a folder runs this very code from transformers' module cache; saving it again writes the
same files (the default there is self-contained, as there is no package to point to).
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import importlib.metadata
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from transformers.dynamic_module_utils import get_imports

from . import compat

SEPARATOR = "__"
# The name the package was installed under; a self-contained copy runs as transformers_modules.<folder>.<hash>.
PACKAGE = "hf_tensor_attn"
# What a save writes: the loader module and the package's modules. A new save replaces all of them, so a folder saved
# self-contained and then saved again pointing to the package keeps no stale copies.
CODE_FILES = re.compile(rf"^({compat.REMOTE_MODULE}|{PACKAGE}{SEPARATOR}.*)\.py$")
IS_COPY = not __name__.startswith(f"{PACKAGE}.")
ROOT = Path(__file__).resolve().parent
# What a torch + transformers environment is sure to have besides the standard library: the requirements of the two
# that hold on every platform.
BASE_DISTRIBUTIONS = ("torch", "transformers")

_self_contained: contextvars.ContextVar[bool | None] = contextvars.ContextVar("self_contained", default=None)


def flat_name(module: str) -> str:
    """`ops.exact.tiled` -> `hf_tensor_attn__ops__exact__tiled`, the file name (without .py) of a package module in
    the folder."""
    return SEPARATOR.join([PACKAGE, *module.split(".")]) if module else PACKAGE


def available_imports() -> frozenset[str]:
    """Top-level import names a torch + transformers environment has: the standard library, the two packages and
    their unconditional requirements, and theirs (torch needs sympy, which needs mpmath)."""
    required, queue = set(), [canonicalize_name(d) for d in BASE_DISTRIBUTIONS]
    while queue:
        dist = queue.pop()
        if dist in required:
            continue
        required.add(dist)
        try:
            lines = importlib.metadata.requires(dist) or ()
        except importlib.metadata.PackageNotFoundError:
            continue
        queue += [canonicalize_name(r.name) for r in map(Requirement, lines) if r.marker is None]
    names = {name for name, dists in importlib.metadata.packages_distributions().items()
             if any(canonicalize_name(d) in required for d in dists)}
    return frozenset(names | set(sys.stdlib_module_names) | set(BASE_DISTRIBUTIONS))


class Source:
    """One module of the package: its dotted name (relative to the package root), file and parsed text."""

    def __init__(self, module: str, path: Path):
        self.module, self.path = module, path
        self.text = path.read_text(encoding="utf-8")
        self.tree = ast.parse(self.text, filename=str(path))
        self.is_package = path.name == "__init__.py"

    def resolve(self, node: ast.ImportFrom) -> str:
        """The module a relative import names, e.g. `..ops.exact.decode` in cache/two.py -> `ops.exact.decode`."""
        parts = self.module.split(".") if self.module else []
        if not self.is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
        return ".".join(parts + ([node.module] if node.module else []))


def _module_path(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split(".")) if module else ROOT
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _relative_imports(source: Source) -> Iterator[tuple[ast.ImportFrom, list[tuple[str, str | None, str]]]]:
    """Each relative import with what it binds: (module, attribute or None for the module itself, bound name)."""
    for node in ast.walk(source.tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = source.resolve(node)
            base_path = _module_path(base)
            base_is_package = node.module is None or (base_path is not None and base_path.name == "__init__.py")
            bound = []
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                if base_is_package and _module_path(sub) is not None:  # a submodule, e.g. `from . import compat`
                    bound.append((sub, None, alias.asname or alias.name))
                else:
                    bound.append((base, alias.name, alias.asname or alias.name))
            yield node, bound


def collect(roots: list[str]) -> tuple[dict[str, Source], dict[str, list[str]]]:
    """The modules reachable from `roots` by relative imports, and those left out with the packages they lack."""
    available = available_imports()
    included: dict[str, Source] = {}
    left_out: dict[str, list[str]] = {}
    queue = list(roots)
    while queue:
        module = queue.pop()
        if module in included or module in left_out:
            continue
        path = _module_path(module)
        if path is None:
            raise ValueError(f"self_contained=True: module {PACKAGE}.{module} has no file under {ROOT}")
        missing = [name for name in get_imports(path) if name not in available]
        if missing:
            left_out[module] = missing
            continue
        source = included[module] = Source(module, path)
        for _, bound in _relative_imports(source):
            queue.extend(m for m, _, _ in bound)
    return included, left_out


def _top_level_nodes(tree: ast.Module) -> set[int]:
    """ids of the import nodes that run at import time (not inside a function)."""
    found: set[int] = set()

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and not in_function:
                found.add(id(child))
            visit(child, nested)

    visit(tree, False)
    return found


def rewrite(source: Source, left_out: dict[str, list[str]]) -> str:
    """The module's text with each relative import pointing at the flat files."""
    at_import = _top_level_nodes(source.tree)
    lines = source.text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line.encode("utf-8")))
    data = source.text.encode("utf-8")
    edits = []
    for node, bound in _relative_imports(source):
        missing = sorted({m for m, _, _ in bound if m in left_out})
        if missing:
            if id(node) in at_import:
                raise ValueError(
                    f"self_contained=True: {PACKAGE}.{source.module} imports {PACKAGE}.{missing[0]} when it is "
                    f"imported, and that module needs {left_out[missing[0]]}, which a torch + transformers "
                    "environment may lack; import it where it is used (as ops.exact.triton_kernels is)"
                )
            needs = ", ".join(sorted({p for m in missing for p in left_out[m]}))
            why = (f"{PACKAGE}.{missing[0]} (it needs {needs}) is not part of this self-contained checkpoint; install "
                   f"the {PACKAGE} package for it")
            statement = f"raise ModuleNotFoundError({why!r})"
        else:
            modules = [f"from . import {flat_name(module)} as {name}" for module, attribute, name in bound
                       if attribute is None]
            attributes: dict[str, list[str]] = {}
            for module, attribute, name in bound:
                if attribute is not None:
                    attributes.setdefault(module, []).append(attribute + (f" as {name}" if name != attribute else ""))
            statement = "; ".join(modules + [f"from .{flat_name(module)} import {', '.join(names)}"
                                             for module, names in attributes.items()])
        start = offsets[node.lineno - 1] + node.col_offset
        end = offsets[node.end_lineno - 1] + node.end_col_offset
        edits.append((start, end, statement.encode("utf-8")))
    for start, end, statement in sorted(edits, reverse=True):
        data = data[:start] + statement + data[end:]
    return data.decode("utf-8")


def loader_source(classes: dict[str, type], included: dict[str, Source], version: str) -> str:
    by_module: dict[str, list[str]] = {}
    for name, cls in classes.items():
        by_module.setdefault(cls.__module__, []).append(name)
    imports = "".join(f"from .{flat_name(_package_relative(m))} import {', '.join(sorted(n))}\n"
                      for m, n in sorted(by_module.items()))
    listed = "".join(f"    from .{flat_name(m)} import __name__\n" for m in sorted(included))
    return (
        f'"""This checkpoint\'s code: {PACKAGE} {version}, written by save_pretrained(..., self_contained=True). Each\n'
        f'{PACKAGE}{SEPARATOR}*.py file beside this one is a module of the package with its relative imports renamed\n'
        'to those files. Load with trust_remote_code=True; nothing but torch and transformers is needed."""\n\n'
        "from typing import TYPE_CHECKING\n\n"
        f"{imports}\n"
        f'SELF_CONTAINED = "{PACKAGE} {version}"\n\n'
        "if TYPE_CHECKING:  # never run: transformers copies the files that lines of this form name, and the package\n"
        "    # imports some modules as `from . import NAME`, which it does not read\n"
        f"{listed}"
    )


def _package_relative(module: str) -> str:
    """`hf_tensor_attn.modeling` (or a self-contained copy's `transformers_modules.x.y.hf_tensor_attn__modeling`)
    -> `modeling`."""
    leaf = module.rsplit(".", 1)[-1]
    if leaf.startswith(PACKAGE + SEPARATOR):
        return leaf[len(PACKAGE + SEPARATOR):].replace(SEPARATOR, ".")
    return module.removeprefix(PACKAGE + ".")


def _exported_classes() -> dict[str, type]:
    """The classes `auto_map` names (config, models, tokenizers), which the loader module re-exports."""
    from .configuration import TensorAttnConfig
    from .modeling import TensorAttnForCausalLM, TensorAttnModel
    from .tokenization import TensorAttnByteTokenizer
    from .tokenization_fast import TensorAttnByteTokenizerFast

    return {cls.__name__: cls for cls in (TensorAttnConfig, TensorAttnModel, TensorAttnForCausalLM,
                                          TensorAttnByteTokenizer, TensorAttnByteTokenizerFast)}


def package_version() -> str:
    """The package's version; a self-contained copy reads the one its loader module records."""
    if not IS_COPY:
        return sys.modules[PACKAGE].__version__
    text = (ROOT / f"{compat.REMOTE_MODULE}.py").read_text(encoding="utf-8")
    return re.search(rf'^SELF_CONTAINED = "{PACKAGE} (.+)"$', text, flags=re.MULTILINE).group(1)


def write_code(folder, version: str) -> list[str]:
    """Write the loader module and the package modules it needs into `folder`; the names written."""
    classes = _exported_classes()
    roots = sorted({_package_relative(cls.__module__) for cls in classes.values()})
    if IS_COPY:  # this code is itself a checkpoint's copy: the files are already flat, written as they are
        files = {path.name: path.read_text(encoding="utf-8") for path in ROOT.glob(f"{PACKAGE}{SEPARATOR}*.py")}
        files[f"{compat.REMOTE_MODULE}.py"] = (ROOT / f"{compat.REMOTE_MODULE}.py").read_text(encoding="utf-8")
    else:
        included, left_out = collect(roots)
        files = {f"{flat_name(m)}.py": rewrite(source, left_out) for m, source in included.items()}
        files[f"{compat.REMOTE_MODULE}.py"] = loader_source(classes, included, version)
    folder = Path(folder)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return sorted(files)


@contextlib.contextmanager
def saving(self_contained: bool | None) -> Iterator[None]:
    """Within a model's save: the config and generation files it writes follow the same choice."""
    token = _self_contained.set(self_contained)
    try:
        yield
    finally:
        _self_contained.reset(token)


def is_self_contained(folder) -> bool:
    """Whether `folder` holds a self-contained save's loader module."""
    loader = Path(folder) / f"{compat.REMOTE_MODULE}.py"
    return loader.is_file() and "\nSELF_CONTAINED = " in loader.read_text(encoding="utf-8")


def resolve(self_contained: bool | None, target=None) -> bool:
    """The choice a save into `target` makes: the argument, else the enclosing model save's, else self-contained
    where `target` already is (a tokenizer saved beside a self-contained model keeps the folder so) or where this
    code is itself a checkpoint's copy."""
    if self_contained is None:
        self_contained = _self_contained.get()
    if self_contained is None:
        self_contained = IS_COPY or (target is not None and is_self_contained(target))
    if not isinstance(self_contained, bool):
        raise ValueError(f"`self_contained` must be True, False or None (the default), got {self_contained!r}")
    return self_contained


def write_loader(folder, self_contained: bool | None = None, target=None) -> None:
    """Write the module `auto_map` names into `folder` (the staging folder of a save into `target`): the
    package's code when `resolve` says self-contained, else the stub that imports the installed package."""
    if resolve(self_contained, target):
        write_code(folder, package_version())
    else:
        compat.write_remote_module(folder)


__all__ = [
    "CODE_FILES", "available_imports", "collect", "flat_name", "is_self_contained", "package_version", "resolve",
    "rewrite", "saving", "write_code", "write_loader",
]
