"""The storage contract every destination implements, and the streaming helpers the backends share.

Keys are relative, `/`-separated paths such as `daily/erp_backup_daily_20251119_020000.sql.gz`.
Contract (what callers may rely on):
- `put` stores a local file, or a folder (directory-format dumps), under `key` so that the key appears
  whole or not at all, and never replaces an existing key (it raises `StorageError` instead) unless
  `replace=True` is given for a file (sidecars: a manifest changes as copies are added), in which case
  the old version is atomically overwritten: a reader sees the old one or the new one, never neither. It streams:
  nothing is read whole into memory; object stores upload in bounded parts. A folder is stored as one
  object per file under `key/<relative path>`; `get` of the key restores the folder, `stat` gives its total
  size and `delete` removes all of it. `put` returns what was stored, with the SHA-256 of a file (a
  folder's is None). A caller that already knows the file's SHA-256 passes it, so the backend need not
  read the file twice; if the bytes read while uploading do not hash to it, nothing is published.
  `put` may consume its source: LocalStorage moves a file on the same file system instead of copying it.
- `get` writes the object to a local path (a folder for a folder key) through a temporary name, and checks
  what it read against the size and SHA-256 recorded at upload where the backend has them.
- `capabilities` (a `Capabilities`) says what the backend does beyond this contract.
- `close()` releases the backend's connection; backends are context managers (`with open_storage(spec)
  as storage:`), one per destination per step.
- `load(key, open_sink)` streams one stored file (a file key, or `folder/<relative path>` inside a stored
  folder) into a new sink from `open_sink()` and returns that sink; a retried load calls `open_sink` again,
  so a sink never sees a byte twice. Deep verification is built on it, once, above the backends
  (`pgbeat.storage.verification`).
- `stat` returns None for a missing key; `list(prefix)` returns the objects directly under `prefix`
  (one level, sorted by key, a stored folder counting as one object; checksums only where the listing
  carries them, `stat` has the rest); `delete` of a missing key is not an error (deleting twice is fine).
  Object stores list only stored objects and folders; LocalStorage and SSH also list plain sub-folders.
- `verify(key, size, sha256, deep=False)` raises `StorageError` when the stored copy is missing or its
  size or checksum differs from what is expected. Shallow checks use metadata the destination keeps
  (object size and checksums, or a hash computed on the remote host); `deep=True` reads the copy back
  and hashes it (a scrub). For a folder pass `sha256=None`: its files are checked against the hashes
  recorded when it was stored, where the backend records them (object stores, in their folder marker);
  a local or SSH folder keeps none, so callers with a manifest use `verification.verify_copy`, which
  compares every file with the manifest's per-file SHA-256 on any backend.

Errors and retries (restic style): every failure raises `pgbeat.errors.StorageError` naming the
destination and the key, never a secret. `TransientStorageError` (connection refused or lost, timeouts,
5xx, throttling) may succeed if the same call is made again; any other `StorageError` (authentication,
permissions, missing key, refusing to overwrite, checksum mismatch) will not. Backends do not retry on
their own beyond their SDK's per-request retries; `wrappers.RetryingStorage` adds retries. Every method
is safe to call again after a transient failure: `get`, `stat`, `list` and `verify` only read, `delete`
is idempotent, and a `put` that failed left no object under its key (RetryingStorage also recognises a
put whose response was lost but whose object landed).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

from pgbeat.errors import StorageError


@dataclass(frozen=True)
class ObjectInfo:
    """A stored object: its key, size in bytes, and the checksums the destination knows cheaply (hex)."""

    key: str
    size: int
    modified: datetime | None = None
    sha256: str | None = None
    md5: str | None = None
    crc32c: str | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a backend does beyond the contract, so that the layers above can choose the cheaper path.

    `shallow_reads_back`: the destination keeps no checksum of its own, so a shallow `verify` reads the
    data itself (a local folder, an SSH account without `sha256sum`): checking every file against the
    manifest costs no more, and verification does it even when not asked to go deep.
    `consumes_source`: `put` may move its source into place instead of copying it (same file system).
    """

    shallow_reads_back: bool = False
    consumes_source: bool = False


class Sink(Protocol):
    """Where `Storage.load` writes what it reads: anything with `write(bytes)`."""

    def write(self, data: bytes, /) -> object: ...


S = TypeVar("S", bound=Sink)


class Storage(Protocol):
    name: str
    capabilities: Capabilities

    def close(self) -> None: ...

    def __enter__(self) -> Storage: ...

    def __exit__(self, *exc_info: object) -> None: ...

    def put(self, source: Path, key: str, sha256: str | None = None, *, replace: bool = False) -> ObjectInfo: ...

    def get(self, key: str, dest: Path) -> None: ...

    def load(self, key: str, open_sink: Callable[[], S]) -> S: ...

    def stat(self, key: str) -> ObjectInfo | None: ...

    def list(self, prefix: str = "") -> list[ObjectInfo]: ...

    def walk(self, prefix: str) -> list[ObjectInfo]:
        """Every stored file under the folder `prefix`, at any depth (keys from the destination's root), not a
        staging copy: what a listing of the WAL archive's folders needs, in one pass where the store can."""
        ...

    def delete(self, key: str) -> None: ...

    def verify(self, key: str, size: int, sha256: str | None, deep: bool = False) -> None: ...

    def describe(self, key: str) -> str:
        """Return where `key` lives, for messages and manifests (a path or a URL, without secrets)."""
        ...


class Closing:
    """What every backend and wrapper shares: `close()` releases its connection (the next operation would
    open a new one), and `with backend:` closes it at the end, so a step opens one backend (and one SSH
    connection) per destination and does not leave it open."""

    def close(self) -> None:
        """Release the connection, if any (closing twice is fine)."""

    def __enter__(self: C) -> C:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


C = TypeVar("C", bound=Closing)


def check_key(storage: str, key: str, *, allow_empty: bool = False) -> str:
    """Given a key, return it without surrounding slashes. Raise StorageError if it is not a plain relative path."""
    clean = key.strip("/")
    if not clean:
        if allow_empty:
            return ""
        raise StorageError(f"{storage}: empty key")
    parts = clean.split("/")
    if "\\" in clean or any(ord(c) < 32 for c in clean) or any(part in ("", ".", "..") for part in parts):
        raise StorageError(f"{storage}: invalid key {key!r} "
                           "(use a relative path without '.', '..', '//' or control characters)")
    return clean


def mismatch(where: str, problems: list[str]) -> StorageError:
    return StorageError(f"{where}: stored copy does not match: {'; '.join(problems)}",
                        hint="the copy is damaged or was replaced: store the backup again or restore from another copy")


def compare(size: int | None, sha256: str | None, expected_size: int | None, expected_sha256: str | None) -> list[str]:
    """Return the differences between what was found and what was expected, as phrases for a message."""
    problems = []
    if expected_size is not None and size is not None and size != expected_size:
        problems.append(f"size {size} bytes, expected {expected_size}")
    if expected_sha256 and sha256 and sha256.lower() != expected_sha256.lower():
        problems.append(f"SHA-256 {sha256[:16]}…, expected {expected_sha256[:16]}…")
    return problems


# --- folders ---------------------------------------------------------------------------------------------


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """Given a local folder, return its regular files as (relative `/` path, path), sorted by relative path."""
    files = []
    for path in folder.rglob("*"):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise StorageError(f"{folder}: {path.relative_to(folder)} is not a regular file or folder")
        if path.is_file():
            files.append((path.relative_to(folder).as_posix(), path))
    return sorted(files)


# --- bandwidth ---------------------------------------------------------------------------------------------


class RateLimiter:
    """A token bucket shared by every transfer of one destination: `consume(n)` sleeps to keep the average
    rate at `bytes_per_second`, letting at most `burst` bytes through without waiting after an idle spell."""

    def __init__(self, bytes_per_second: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], Any] = time.sleep) -> None:
        if bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive")
        self.rate = float(bytes_per_second)
        self.burst = float(burst if burst is not None else bytes_per_second / 4)
        self._clock = clock
        self._sleep = sleep
        self._tokens = 0.0
        self._last = clock()
        self._lock = threading.Lock()

    def consume(self, n: int) -> None:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate) - n
            self._last = now
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)


_LIMITERS: ContextVar[tuple[RateLimiter, ...]] = ContextVar("pgbeat_storage_limiters", default=())


@contextlib.contextmanager
def bandwidth_limit(limiter: RateLimiter) -> Iterator[None]:
    """Within this block, every byte a backend sends or receives in this thread is paced by `limiter`."""
    token = _LIMITERS.set((*_LIMITERS.get(), limiter))
    try:
        yield
    finally:
        _LIMITERS.reset(token)


def throttle(n: int) -> None:
    """Account for `n` bytes moved over the network: wait as long as the active bandwidth limits ask."""
    for limiter in _LIMITERS.get():
        limiter.consume(n)


# --- hashing streams -------------------------------------------------------------------------------------


class HashingReader:
    """A read-only file wrapper that hashes every byte once and counts it against the bandwidth limit.

    Clients that rewind to resend a chunk (resumable uploads) may seek back: bytes already hashed are
    not hashed again, so the digests stay those of the file. Seeking forward past unread bytes makes the
    digests unusable (`complete` turns False).
    """

    def __init__(self, raw: BinaryIO, hashers: dict[str, Any] | None = None) -> None:
        self.raw = raw
        self.hashers = hashers if hashers is not None else {"sha256": hashlib.sha256()}
        self.pos = raw.tell()
        self.hashed = self.pos
        self.complete = self.pos == 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            start, end = self.pos, self.pos + len(data)
            if start > self.hashed:
                self.complete = False
            elif end > self.hashed:
                new = data if start == self.hashed else data[self.hashed - start:]
                for hasher in self.hashers.values():
                    hasher.update(new)
                self.hashed = end
            self.pos = end
            throttle(len(data))
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = self.raw.seek(offset, whence)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def hexdigest(self, name: str = "sha256") -> str:
        if not self.complete:
            raise StorageError("internal error: the upload stream skipped bytes, its checksum is unknown")
        return self.hashers[name].hexdigest()

    def digest(self, name: str) -> bytes:
        if not self.complete:
            raise StorageError("internal error: the upload stream skipped bytes, its checksum is unknown")
        return self.hashers[name].digest()


class HashingWriter:
    """A write-only file wrapper that hashes and counts what is written (downloads)."""

    def __init__(self, raw: BinaryIO | Sink, hashers: dict[str, Any] | None = None) -> None:
        self.raw = raw
        self.hashers = hashers if hashers is not None else {"sha256": hashlib.sha256()}
        self.size = 0

    def write(self, data: bytes) -> int:
        for hasher in self.hashers.values():
            hasher.update(data)
        self.raw.write(data)
        self.size += len(data)
        throttle(len(data))
        return len(data)

    def flush(self) -> None:
        flush = getattr(self.raw, "flush", None)  # a load's sink need not have one
        if flush is not None:
            flush()

    def hexdigest(self, name: str = "sha256") -> str:
        return self.hashers[name].hexdigest()


def counted(sink: Sink) -> HashingWriter:
    """Given a load's sink, return a writer into it that counts the bytes against the bandwidth limit."""
    return HashingWriter(sink, hashers={})


# --- staging names ---------------------------------------------------------------------------------------


def staging_name(name: str, kind: str = "partial") -> str:
    """Given a final file name, return the hidden, unique name it is written under first (`kind` "partial")
    or moved to before it is removed ("deleting"): `.NAME.partial-1a2b3c4d`. Unique, so that two writers
    of the same name never write into each other's file."""
    return f".{name}.{kind}-{uuid.uuid4().hex[:8]}"


def is_staging(name: str) -> bool:
    """True for a name made by `staging_name` (or an older pgbeat's `.NAME.partial`): not a backup."""
    return name.startswith(".") and (".partial" in name or ".deleting-" in name)


def partial_name(final: Path) -> Path:
    """The hidden sibling a download is written to before it gets its final name."""
    return final.with_name(staging_name(final.name))
