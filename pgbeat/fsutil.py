"""File-system helpers shared by the steps: private folders, atomic writes, no-clobber publishing, and
the lock that marks a work folder as in use.

Backups hold a whole database: files are created 0600 and folders 0700 whatever the umask.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from pgbeat.errors import DiskFullError, StorageError

CHUNK = 1 << 20  # bytes read or written at a time while streaming a file or a pipe

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) as 0700 folders; tighten it if it exists. Return it."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=DIR_MODE)
    os.chmod(path, DIR_MODE)
    return path


def open_private(path: Path, mode: str = "wb"):
    """Open a new file for writing with mode 0600 from the first byte (no window with wider rights)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, mode)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename, so readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open_private(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise disk_error(exc, path) from None
    fsync_dir(path.parent)


def publish(source: Path, final: Path) -> None:
    """Move `source` to `final` on the same file system without ever replacing an existing `final`.

    A file is hard-linked then unlinked (link fails if `final` exists); a folder is renamed, which
    fails on an existing non-empty folder. Either way the final name appears whole or not at all.
    """
    try:
        if source.is_dir():
            if final.exists():
                raise FileExistsError(errno.EEXIST, "exists", str(final))
            os.rename(source, final)
        else:
            os.link(source, final)
            os.unlink(source)
    except FileExistsError:
        raise StorageError(f"Refusing to overwrite existing backup {final}") from None
    fsync_dir(final.parent)


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def disk_error(exc: OSError, path: Path) -> Exception:
    """Translate an OSError from writing `path` into pgbeat's error with a useful hint."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"No space left on the device while writing {path}",
                             hint="free space under BACKUP_ROOT or lower retention; nothing was rotated")
    return StorageError(f"Cannot write {path}: {exc.strerror or exc}")


def tree_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# --- work folders in use --------------------------------------------------------------------------------

LOCK_FILE = ".lock"
# The folders this process holds: (pid, folder) -> [lock fd, depth]. Keyed by pid too, so a forked child
# never takes its parent's entries for its own.
_held: dict[tuple[int, str], list[int]] = {}


def _flock(fd: int, deadline: float) -> bool:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _create_locked(folder: Path) -> int | None:
    """Create `folder` with its lock already held: built under a hidden name, then renamed into place, so
    it never exists unlocked. Return the lock's fd, or None if the folder appeared meanwhile."""
    staging = folder.with_name(f".{folder.name}.new-{os.getpid()}")
    remove_path(staging)
    private_dir(staging)
    fd = os.open(staging / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        os.rename(staging, folder)  # fails on a folder that exists and is not empty
    except OSError:
        os.close(fd)
        remove_path(staging)
        return None
    return fd


def acquire_dir(folder: Path, *, create: bool = False, wait: float = 30.0) -> bool | None:
    """Given a work folder, take its lock (an flock on `folder/.lock`, released by the kernel when this
    process dies). Return True when held, False when the folder does not exist (and `create` is false),
    None when another process still holds it after `wait` seconds. Holds nest within one process."""
    key = (os.getpid(), os.path.abspath(folder))
    if key in _held:
        _held[key][1] += 1
        return True
    deadline = time.monotonic() + wait
    while True:
        if not folder.is_dir():
            if not create:
                return False
            fd = _create_locked(folder)
            if fd is None:
                continue  # another process made it first: lock that one
        else:
            try:
                fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed meanwhile
            if not _flock(fd, deadline):
                os.close(fd)
                return None
            if not _same_file(fd, folder / LOCK_FILE):
                os.close(fd)  # the folder was removed (or replaced) while we waited for its lock
                continue
        _held[key] = [fd, 1]
        return True


def release_dir(folder: Path) -> None:
    """Give back one hold of `folder` taken by `acquire_dir` (the lock goes with the last one)."""
    key = (os.getpid(), os.path.abspath(folder))
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        os.close(entry[0])


@contextlib.contextmanager
def hold_dir(folder: Path, *, create: bool = False, wait: float = 30.0) -> Iterator[bool | None]:
    """Hold `folder` in use inside the block (see `acquire_dir`, whose result is yielded): a sweep of
    leftovers never removes a folder that a live process holds. The folder may be removed inside the block."""
    held = acquire_dir(folder, create=create, wait=wait)
    try:
        yield held
    finally:
        if held:
            release_dir(folder)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
