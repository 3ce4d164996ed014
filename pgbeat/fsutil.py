"""File-system helpers shared by the steps: private folders, atomic writes, no-clobber publishing.

Backups hold a whole database: files are created 0600 and folders 0700 whatever the umask.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from pgbeat.errors import DiskFullError, StorageError

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
