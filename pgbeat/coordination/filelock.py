"""The embedded default's target lock: an flock, released by the kernel when its process dies."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from pgbeat.errors import LockHeldError
from pgbeat.fsutil import FILE_MODE, private_dir


class FileLock:
    """An exclusive flock on `BACKUP_ROOT/.locks/<name>.lock`, for the embedded default."""

    def __init__(self, backup_root: Path, name: str) -> None:
        self.path = backup_root / ".locks" / f"{name}.lock"
        self._fd: int | None = None

    def acquire(self, wait: float = 0.0, on_busy: Callable[[str | None], None] | None = None) -> bool:
        """Take the lock, waiting up to `wait` seconds; return whether it was taken. `on_busy(holder)` is
        told once, with the holder's pid as it wrote it, when the lock is not free at once."""
        private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        deadline = time.monotonic() + wait
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return True
            except BlockingIOError:
                if on_busy is not None and not told:
                    told = True
                    on_busy(os.pread(fd, 32, 0).decode(errors="replace").strip() or None)
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold_file_lock(backup_root: Path, target: str, wait: float,
                   on_wait: Callable[[str], None] | None = None) -> FileLock:
    """Take `target`'s lock, waiting up to `wait` seconds (`on_wait` is told what it waits for, once)."""
    lock = FileLock(backup_root, f"target-{target}")
    busy = None if on_wait is None else lambda holder: on_wait(
        f"waiting for the lock of {target}: another run holds it{f' (pid {holder})' if holder else ''}; "
        f"up to {wait:.0f}s")
    if not lock.acquire(wait, busy):
        raise LockHeldError(f"Another backup of {target} is running on this host (lock {lock.path})",
                            hint="wait for it to finish; pgbeat never runs two dumps of one target at once")
    return lock
