"""Crash-safe folders: a save writes into a temporary folder beside its target, and the folder is swapped in only once
every file in it is complete and on disk. A save that fails half-way (disk full, killed) leaves the previous
contents of the target loadable, and the half-written folder never carries the target's name.

    with atomic_directory("runs/model") as staging:
        write_everything_into(staging)
    # here runs/model holds the new files, plus the old files the save did not rewrite

Swapping uses Linux's renameat2(RENAME_EXCHANGE) when the filesystem has it (one atomic step); elsewhere two
renames, between which the old folder survives under a `.old` name beside the target.

The temporary names carry this host and process id, so the next save into the same parent folder removes what a
killed save left (and puts an old folder that a killed fallback swap left back in place) without touching the
folders of saves still running. A target that is a symbolic link is saved through: the folder it points to is
replaced, the link stays. The new folder gets the old folder's mode, or, for a new folder, the mode the umask gives.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import re
import secrets
import shutil
import socket
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

# Weight files of a model save: a new save replaces all of them (transformers deletes stale shards itself), so the
# old ones are not carried over beside the new ones.
MODEL_WEIGHT_FILES = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# ".NAME.saving-HOST-PID-RANDOM" and ".NAME.old-HOST-PID": HOST is a hash of the host name, so a folder shared between
# machines is cleaned only by the machine whose process ids the names hold.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>saving|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)(-[0-9a-f]+)?$")


def fsync_tree(root: Path) -> None:
    """Flush every file under root, then every folder (so their entries are durable too)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _fsync_dir(folder) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _libc():
    """The C library, or None; looked up once (on Linux `find_library` runs ldconfig in a subprocess)."""
    name = ctypes.util.find_library("c")
    return None if name is None else ctypes.CDLL(name)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names a and b; False where the system cannot (not Linux, old kernel, filesystem)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "renameat2"):
        return False
    result = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)  # the old folder is never written again, so sharing its files is safe and free
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path, replaced: Callable[[str], bool]) -> None:
    """Files and folders of `old` that the save did not write into `new` (and that it does not `replace`)."""
    for entry in old.iterdir():
        if (new / entry.name).exists() or replaced(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


@contextlib.contextmanager
def atomic_directory(target, replaced: Callable[[str], bool] = lambda name: False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; when the block completes, put it in target's place.

    Files already in target that the block did not write are kept (a model saved into a folder keeps the tokenizer
    saved there), except those `replaced(name)` says a new save supersedes. If the block raises, the temporary
    folder is removed and target is untouched.
    """
    target = Path(os.path.realpath(target))  # a link is saved through: its folder is swapped, the link kept
    if target.exists() and not target.is_dir():
        raise ValueError(f"cannot save into {str(target)!r}: it is a file, not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    staging = _make_staging(target)
    try:
        yield staging
        if target.is_dir():
            _carry_over(target, staging, replaced)
        fsync_tree(staging)
        swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after a swap this is the old folder; after a failure, the new


def _host() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _make_staging(target: Path) -> Path:
    """An empty folder beside target. os.mkdir applies the umask, as a plain save's folder gets it (mkdtemp would
    give 0700); an existing target's mode is kept."""
    while True:
        staging = target.with_name(f".{target.name}.saving-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(staging)
            break
        except FileExistsError:
            continue
    if target.is_dir():
        os.chmod(staging, target.stat().st_mode & 0o7777)
    return staging


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(parent: Path) -> None:
    """Remove the staging folders that killed saves on this host left in `parent`; an old folder that a killed
    fallback swap left goes back to its name when nothing took that name, else it is removed."""
    host = _host()
    for entry in list(parent.iterdir()):
        match = _TEMPORARY.match(entry.name)
        if match is None or match["host"] != host or _alive(int(match["pid"])):
            continue
        original = parent / match["name"]
        if match["kind"] == "old" and not original.exists():
            with contextlib.suppress(OSError):  # where it cannot be renamed it is still the only copy: keep it
                os.rename(entry, original)
            continue
        shutil.rmtree(entry, ignore_errors=True)


def swap_in(staging: Path, target: Path) -> None:
    """Give staging the name target; afterwards `staging` names the old folder (or nothing)."""
    if not target.exists():
        os.rename(staging, target)
    elif not _exchange(staging, target):
        old = target.with_name(f".{target.name}.old-{_host()}-{os.getpid()}")
        os.rename(target, old)
        os.rename(staging, target)
        os.rename(old, staging)
    _fsync_dir(target.parent)


__all__ = ["MODEL_WEIGHT_FILES", "atomic_directory", "fsync_tree", "remove_stale_temporaries", "swap_in"]
