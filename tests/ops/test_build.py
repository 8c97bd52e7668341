"""The compiled loops' build and cache (`ops.extension`, `python -m hf_tensor_attn.build`): announced before it starts,
PATH left alone, no wait on a killed build's lock, damaged libraries rebuilt or skipped with one warning, read-only
caches used, one build shared by two checkouts; and the tile planner's L2 size (`HF_TENSOR_ATTN_L2_BYTES`).

The tests of the build's flow replace the child build (`extension._compile`) by a copy and record loads instead of
loading; the ones that must see a real process (a crash, a real lock, a real build) run Python in a child process on
a copy of this process's cache folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from hf_tensor_attn.ops import extension
from hf_tensor_attn.ops.exact import tiles

REPO = Path(extension.__file__).resolve().parents[2]
TIMEOUT_S = 600  # a real build on a busy 2-core machine; a hang shows as this timeout


@pytest.fixture
def built():
    """The library this process loaded (built or found in the test session's cache)."""
    if extension.cpu_ops() is None:
        pytest.skip("the compiled CPU tile loops could not be built here (see its RuntimeWarning)")
    return Path(extension.describe()["library"])


@pytest.fixture
def cache(built, tmp_path, monkeypatch):
    """An empty cache folder for this process's builds; loads are recorded instead of done (this process has its
    library loaded, and a namespace of ops registers once)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setattr(extension, "_state", dict(extension._state))
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    return loaded


def copying(library: Path, calls: list):
    """A stand-in for the child build that copies a library that loads."""

    def compile(path, flags, lock):
        calls.append(path)
        shutil.copyfile(library, path)

    return compile


def target() -> Path:
    return extension._library_path(extension._openmp_choices()[0])


def test_build_says_where_and_how_long_before_it_starts_and_leaves_path_alone(cache, built, monkeypatch, caplog):
    path_before, seen = os.environ.get("PATH"), []

    def compile(path, flags, lock):
        seen.append([r.getMessage() for r in caplog.records])
        assert os.environ.get("PATH") == path_before
        shutil.copyfile(built, path)

    monkeypatch.setattr(extension, "_compile", compile)
    with caplog.at_level(logging.WARNING, logger=extension.__name__):
        assert extension.build() is not None
    folder = target().parent
    assert seen == [[f"hf_tensor_attn: building the compiled CPU tile loops in {folder} (usually 15 s to a minute; "
                     "once per torch version, source and CPU kind)"]]
    assert len(caplog.records) == 1 and cache == [str(target())]
    assert json.loads(Path(f"{target()}.check").read_text())["error"] is None


@pytest.mark.parametrize("ninja_installed", [True, False])
def test_ninja_package_is_on_the_build_process_path_only(ninja_installed, cache, built, monkeypatch):
    seen = []

    def run(command, env, **kwargs):
        seen.append(env["PATH"])
        shutil.copyfile(built, target())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(extension.subprocess, "run", run)
    monkeypatch.setenv("PATH", "/usr/bin")
    if not ninja_installed:
        monkeypatch.setitem(sys.modules, "ninja", None)  # import ninja raises ImportError
    extension.build()
    assert seen == [f"{extension._ninja_dir()}{os.pathsep}/usr/bin" if ninja_installed else "/usr/bin"]
    assert os.environ["PATH"] == "/usr/bin"


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_library_is_rebuilt_with_one_warning(damage, cache, built, monkeypatch, caplog):
    """A library cut short (a copy or a link killed half-way: loading it is a bus error), empty or garbage, at the
    OpenMP build's place: loaded in a child process first, found wanting, rebuilt, with one warning saying why."""
    path = target()
    data = built.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(len(data))}[damage])
    calls = []
    monkeypatch.setattr(extension, "_compile", copying(built, calls))
    with caplog.at_level(logging.WARNING, logger=extension.__name__):
        assert extension.build() is not None
    why = {"truncated": "ended with SIGBUS", "empty": "file too short", "garbage": "invalid ELF header"}[damage]
    assert [r.getMessage() for r in caplog.records] == [
        f"hf_tensor_attn: the cached compiled CPU tile loops cannot be used (loading it in a new process "
        f"{'ended with SIGBUS' if damage == 'truncated' else 'failed: OSError: ' + str(path) + ': ' + why}); "
        f"rebuilding them in {path.parent} (usually 15 s to a minute)"]
    assert calls == [path] and cache == [str(path)] and path.read_bytes() == data


def test_checked_library_loads_without_a_new_check_until_it_changes(cache, built, monkeypatch):
    monkeypatch.setattr(extension, "_compile", copying(built, []))
    extension.build()
    monkeypatch.setattr(extension, "_load_problem", lambda path: pytest.fail("checked again"))
    monkeypatch.setattr(extension, "_compile", lambda *args: pytest.fail("built again"))
    extension.build()
    data = bytearray(target().read_bytes())
    data[-1] ^= 0xFF  # same size, another byte: the record no longer describes the file
    target().write_bytes(data)
    checked = []
    monkeypatch.setattr(extension, "_load_problem", lambda path: checked.append(path))
    extension.build()
    assert checked == [target()] and len(cache) == 3


def test_library_that_builds_but_does_not_load_is_not_rebuilt_by_every_process(cache, built, monkeypatch):
    """E.g. clang's OpenMP calls, which torch's runtime lacks: recorded once; later processes go straight to the build
    without OpenMP, and `--rebuild` tries again."""
    monkeypatch.setattr(torch.backends.openmp, "is_available", lambda: True)
    calls = []

    def compile(path, flags, lock):
        calls.append(path.name)
        shutil.copyfile(built, path)
        if "-fopenmp" in flags:
            raise RuntimeError("Error building extension 'x': undefined symbol: __kmpc_fork_call")

    monkeypatch.setattr(extension, "_compile", compile)
    for _ in range(2):
        assert extension.build() is not None and extension.build_flags() == extension.compile_flags(False)
    assert calls == [f"{extension.library_name(True)}.so", f"{extension.library_name(False)}.so"]
    extension.build(rebuild=True)
    assert calls[2:] == [f"{extension.library_name(True)}.so", f"{extension.library_name(False)}.so"]


def test_killed_torch_build_lock_is_removed_not_waited_on(cache, built, monkeypatch, caplog):
    """torch's own lock (a file that its builder deletes when done) left by a build that was killed outright."""
    stale = target().parent / "lock"
    stale.touch()
    seen = []

    def compile(path, flags, lock):
        seen.append(stale.exists())
        shutil.copyfile(built, path)

    monkeypatch.setattr(extension, "_compile", compile)
    with caplog.at_level(logging.WARNING, logger=extension.__name__):
        assert extension.build() is not None
    assert seen == [False] and f"removing {stale}, left by a build that was killed" in caplog.text


HOLD = """
import fcntl, sys, time
handle = open(sys.argv[1], "a")
fcntl.flock(handle, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


def test_build_waits_for_a_live_builder_and_not_after_it_is_killed(cache, built, monkeypatch, caplog):
    folder = target().parent
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder / extension.LOCK_NAME)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        killer = threading.Timer(2.0, holder.send_signal, [signal.SIGKILL])
        killer.start()
        monkeypatch.setattr(extension, "_compile", copying(built, []))
        with caplog.at_level(logging.WARNING, logger=extension.__name__):
            assert extension.build() is not None
        assert holder.wait(timeout=60) == -signal.SIGKILL
    finally:
        holder.kill()
        holder.wait()
    assert f"waiting for another process building the compiled CPU tile loops in {folder}" in caplog.text


USE = """
import json, os, sys, warnings
import torch
from hf_tensor_attn.ops import extension, tensor_attention

g = torch.Generator().manual_seed(0)
x = [torch.randn(1, 2, 20, 8, generator=g) for _ in range(5)]
compiled = tensor_attention(*x, scale=0.3, w1=6, w2=None)
os.environ[extension.ENV] = "0"
torch.testing.assert_close(compiled, tensor_attention(*x, scale=0.3, w1=6, w2=None), rtol=1e-5, atol=1e-5)
print(json.dumps({**extension.describe(), "module": extension.__file__}))
"""

# Refuses every write under TORCH_EXTENSIONS_DIR (as a read-only file system does, even for root, who may write to a
# folder without write permission); the folder is also made read-only for a run by another user.
READ_ONLY = """
import os, sys
root = os.environ["TORCH_EXTENSIONS_DIR"]
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def refuse(event, args):
    path = args[0] if args else None
    if not (isinstance(path, str) and path.startswith(root)):
        return
    if (event == "open" and (args[2] or 0) & WRITE) or event in ("os.remove", "os.rename", "os.mkdir"):
        raise PermissionError(30, "Read-only file system (test)", path)

sys.addaudithook(refuse)
"""


def run_python(code: str, extensions: Path, pythonpath: Path = REPO) -> tuple[dict, str]:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONPATH": str(pythonpath),
           "OMP_NUM_THREADS": "1"}
    env.pop(extension.ENV, None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                          cwd=pythonpath)  # `-c` puts the working folder first on sys.path
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def copy_library(built: Path, extensions: Path, record: bool = True) -> Path:
    """A cache folder holding only the library (and its record): a prebuilt library, as a user may ship one."""
    folder = extensions / built.parent.name
    folder.mkdir(parents=True)
    shutil.copy2(built, folder)
    if record:
        shutil.copy2(f"{built}.check", folder)
    return folder / built.name


@pytest.fixture
def read_only(tmp_path):
    made = []
    yield made.append
    for folder in made:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


@pytest.mark.parametrize("record", [True, False], ids=["checked", "unchecked"])
def test_read_only_cache_with_a_valid_library_is_used(record, built, tmp_path, read_only):
    """Checked (its record beside it: loaded at once) or not (a library made elsewhere: loaded in a child first)."""
    extensions = tmp_path / "extensions"
    library = copy_library(built, extensions, record)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in library.parent.iterdir())
    read_only(extensions)
    for path in (library, library.parent, extensions):
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    described, stderr = run_python(READ_ONLY + USE, extensions)
    assert described["loaded"] and described["library"] == str(library) and described["failure"] is None
    assert "hf_tensor_attn" not in stderr and "Warning" not in stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in library.parent.iterdir()) == before


def test_damaged_library_in_a_read_only_cache_is_skipped_with_one_warning(built, tmp_path):
    extensions = tmp_path / "extensions"
    library = copy_library(built, extensions)
    data = built.read_bytes()
    library.write_bytes(data[: len(data) // 2])
    described, stderr = run_python(READ_ONLY + USE, extensions)  # the Python loops: the same results
    assert not described["loaded"] and stderr.count("Warning") == 1
    assert (f"{library} cannot be used (loading it in a new process ended with SIGBUS) and its folder cannot be "
            "written") in described["failure"] and described["failure"] in stderr


def test_truncated_library_in_a_copied_cache_after_a_killed_build_is_rebuilt(built, tmp_path):
    """The cache folder copied whole, its library cut short and torch's lock left behind, as a build killed while
    linking leaves them: the next process warns once, rebuilds (a real build) and runs the compiled loops."""
    extensions = tmp_path / "extensions"
    shutil.copytree(built.parent, extensions / built.parent.name)
    library = extensions / built.parent.name / built.name
    data = built.read_bytes()
    library.write_bytes(data[: len(data) // 2])
    (library.parent / "lock").touch()
    described, stderr = run_python(USE, extensions)
    assert described["loaded"] and described["built"] and described["library"] == str(library)
    assert stderr.count("cannot be used (loading it in a new process ended with SIGBUS)") == 1, stderr
    assert "left by a build that was killed" in stderr and "Warning" not in stderr
    # The build read the folder's own copy of the source: any checkout writes the same ninja file, rebuilding nothing.
    assert f"build tiles.o: compile {library.parent / 'tiles.cpp'}" in (library.parent / "build.ninja").read_text()


def test_two_checkouts_share_one_build(built, tmp_path):
    """Two copies of the package (two clones, a worktree) with one cache: `python -m hf_tensor_attn.build` from one
    finds the library in the cache and reports it, and the other uses it; neither rebuilds the other's."""
    extensions = tmp_path / "extensions"
    library = copy_library(built, extensions)
    stamp = library.stat().st_mtime_ns
    other = tmp_path / "other_checkout"
    shutil.copytree(REPO / "hf_tensor_attn", other / "hf_tensor_attn", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONPATH": str(other)}
    done = subprocess.run([sys.executable, "-m", "hf_tensor_attn.build"], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=other)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["loaded"] and report["built"] and report["library"] == str(library) and "building" not in done.stderr
    assert report["capability"] == extension._capability() and report["flags"] == extension.build_flags()
    described, stderr = run_python(USE, extensions, REPO)
    assert described["module"] == extension.__file__ and described["library"] == str(library)
    assert "building" not in stderr and library.stat().st_mtime_ns == stamp


def test_build_command_fails_with_the_reason_where_nothing_builds(tmp_path):
    """No working compiler (CXX names one that fails): exit status 1, the warning and the report say why."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "PYTHONPATH": str(REPO),
           "CXX": "false"}
    done = subprocess.run([sys.executable, "-m", "hf_tensor_attn.build"], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=REPO)
    report = json.loads(done.stdout)
    assert done.returncode == 1 and not report["loaded"] and not report["built"] and report["failure"]
    assert "could not build or load the compiled CPU tile loops" in done.stderr and report["failure"] in done.stderr


@pytest.mark.parametrize("value, size", [("524288", 524288), ("512K", 512 << 10), ("2m", 2 << 20)])
def test_l2_size_from_the_environment(value, size, monkeypatch):
    monkeypatch.setenv(tiles.L2_ENV, value)
    tiles.l2_size.cache_clear()
    try:
        assert tiles.l2_size() == (size, tiles.L2_ENV)
        assert tiles.choose_tile_sizes(64, None, None).col == (128 if size == 512 << 10 else 256)
        assert extension.describe()["l2_bytes"] == size
    finally:
        tiles.l2_size.cache_clear()


@pytest.mark.parametrize("value", ["", "0", "-1", "1.5M", "512 KiB", "lots"])
def test_bad_l2_size_names_the_variable_and_the_form(value, monkeypatch):
    monkeypatch.setenv(tiles.L2_ENV, value)
    tiles.l2_size.cache_clear()
    try:
        with pytest.raises(ValueError, match=rf"HF_TENSOR_ATTN_L2_BYTES must be a positive number of bytes, .* "
                                             rf"got '{value}'"):
            tiles.choose_tile_sizes(64, None, None)
        assert extension.describe()["l2_source"].startswith("HF_TENSOR_ATTN_L2_BYTES must be")
    finally:
        tiles.l2_size.cache_clear()


def test_l2_size_is_read_from_the_machine_once(monkeypatch):
    monkeypatch.delenv(tiles.L2_ENV, raising=False)
    tiles.l2_size.cache_clear()
    reads = []
    real_glob = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: reads.append(pattern) or real_glob(self, pattern))
    try:
        for T in (16, 64, 200):
            tiles.choose_tile_sizes(T, None, 32)
        assert reads == ["index*"]
    finally:
        tiles.l2_size.cache_clear()
