"""The local destination: `BACKUP_ROOT/<tier>/<name>`, files 0600 and folders 0700.

`put` from the same file system moves the source into place (no copy, so nothing is re-read); from
another file system it copies under a hidden, unique name (`base.staging_name`), hashing what it copies,
then publishes.
`verify` re-hashes the file: there is no cheaper metadata to trust on a plain file system.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pgbeat.errors import StorageError
from pgbeat.fsutil import (
    CHUNK,
    DIR_MODE,
    FILE_MODE,
    disk_error,
    fsync_dir,
    open_private,
    private_dir,
    publish,
    remove_path,
    tree_size,
)
from pgbeat.hashing import sha256_file
from pgbeat.storage.base import (
    Capabilities,
    Closing,
    HashingReader,
    ObjectInfo,
    S,
    check_key,
    compare,
    is_staging,
    mismatch,
    staging_name,
)


class LocalStorage(Closing):
    """A folder on this host. `put` from the same file system is a rename, so publishing is atomic."""

    capabilities = Capabilities(shallow_reads_back=True, consumes_source=True)

    def __init__(self, root: Path, name: str = "local") -> None:
        self.root = Path(root)
        self.name = name

    def path(self, key: str) -> Path:
        path = (self.root / check_key(self.name, key)).resolve()
        if self.root.resolve() not in path.parents:
            raise StorageError(f"{self.name}: key {key!r} points outside {self.root}")
        return path

    def describe(self, key: str) -> str:
        return str(self.path(key))

    def put(self, source: Path, key: str, sha256: str | None = None, *, replace: bool = False) -> ObjectInfo:
        final = self.path(key)
        private_dir(final.parent)
        source = Path(source)
        is_dir = source.is_dir()
        if final.exists() and not (replace and final.is_file() and not is_dir):
            raise StorageError(f"{self.name}: refusing to overwrite existing {final}")
        staged = source
        try:
            if os.stat(source).st_dev == os.stat(final.parent).st_dev:
                if not is_dir and sha256 is None:
                    sha256 = sha256_file(source)
            else:  # another file system: copy under a hidden name first, then publish it
                staged = final.with_name(staging_name(final.name))
                if is_dir:
                    shutil.copytree(source, staged)
                else:
                    copied = _copy_hashing(source, staged)
                    if sha256 is not None and copied != sha256.lower():
                        raise StorageError(f"{self.name}: {source} changed while it was copied to {final} "
                                           "(its SHA-256 is not the one given); nothing was stored")
                    sha256 = copied
            _tighten(staged)
            if replace and not is_dir:
                os.replace(staged, final)  # atomic: readers see the old sidecar or the new one
                fsync_dir(final.parent)
            else:
                publish(staged, final)
        except OSError as exc:
            raise disk_error(exc, final) from None
        finally:
            if staged != source:
                remove_path(staged)  # a copy that did not get its final name (gone already if it did)
        info = self.stat(key)
        assert info is not None
        return ObjectInfo(key=info.key, size=info.size, modified=info.modified, sha256=None if is_dir else sha256)

    def get(self, key: str, dest: Path) -> None:
        source = self.path(key)
        if not source.exists():
            raise StorageError(f"{self.name}: {key} does not exist")
        if source.is_dir():
            shutil.copytree(source, dest)
        else:
            shutil.copyfile(source, dest)

    def load(self, key: str, open_sink: Callable[[], S]) -> S:
        """Stream the stored file `key` into a new sink (see `pgbeat.storage.base`)."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                sink = open_sink()
                while chunk := f.read(CHUNK):
                    sink.write(chunk)
        except FileNotFoundError:
            raise StorageError(f"{self.name}: {path} does not exist") from None
        except IsADirectoryError:
            raise StorageError(f"{self.name}: {path} is a folder, not a stored file") from None
        except OSError as exc:
            raise StorageError(f"{self.name}: cannot read {path}: {exc.strerror or exc}") from None
        return sink

    def verify(self, key: str, size: int, sha256: str | None, deep: bool = False) -> None:
        """Check the stored file's size and, when `sha256` is given, re-hash it (shallow and deep alike).
        For a folder, check its total size; `deep` also reads every file."""
        path = self.path(key)
        if not path.exists():
            raise StorageError(f"{self.name}: {path} does not exist")
        try:
            actual = tree_size(path)
            found = sha256_file(path) if path.is_file() and (sha256 or deep) else None
            if path.is_dir() and deep:
                for child in sorted(path.rglob("*")):
                    if child.is_file():
                        sha256_file(child)
        except OSError as exc:
            raise StorageError(f"{self.name}: cannot read {path}: {exc.strerror or exc}") from None
        problems = compare(actual, found, size, sha256)
        if problems:
            raise mismatch(str(path), problems)

    def stat(self, key: str) -> ObjectInfo | None:
        path = self.path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key=key, size=tree_size(path), modified=datetime.fromtimestamp(st.st_mtime, UTC))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        folder = self.path(prefix) if prefix else self.root
        if not folder.is_dir():
            return []
        infos = []
        for entry in sorted(folder.iterdir()):
            if is_staging(entry.name):
                continue  # an interrupted copy, not a backup
            info = self.stat(entry.relative_to(self.root).as_posix())
            if info is not None:
                infos.append(info)
        return infos

    def walk(self, prefix: str) -> list[ObjectInfo]:
        folder = self.path(prefix)
        infos = []
        for parent, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not is_staging(d))
            for name in sorted(files):
                if not is_staging(name):
                    path = Path(parent) / name
                    st = path.stat()
                    infos.append(ObjectInfo(key=path.relative_to(self.root).as_posix(), size=st.st_size,
                                            modified=datetime.fromtimestamp(st.st_mtime, UTC)))
        return infos

    def delete(self, key: str) -> None:
        remove_path(self.path(key))


def _copy_hashing(source: Path, dest: Path) -> str:
    """Copy a file to a new 0600 file, returning the SHA-256 of the bytes copied."""
    with open(source, "rb") as raw, open_private(dest) as out:
        reader = HashingReader(raw)
        while chunk := reader.read(CHUNK):
            out.write(chunk)
        return reader.hexdigest()


def _tighten(path: Path) -> None:
    """Make a file 0600, or a folder tree 0700/0600, before it gets its final name."""
    if path.is_dir():
        os.chmod(path, DIR_MODE)
        for child in path.rglob("*"):
            os.chmod(child, DIR_MODE if child.is_dir() else FILE_MODE)
    else:
        os.chmod(path, FILE_MODE)
