"""What S3 and GCS share: folders as a set of objects plus a marker, no-clobber puts, checked gets, verify.

An object store has flat keys and is atomic per object only. A folder (directory-format dump) under
`key` is stored as `key/<relative path>` objects and, written last, the marker `key/.pgbeat-folder.json`
listing every file with its size and SHA-256. Only a folder with a marker exists for `stat`, `list`,
`get` and `verify`, so a folder appears whole or not at all; objects under a key without a marker are the
leftovers of an interrupted put and the next put or delete of that key removes them. `delete` removes the
marker first, so a half-deleted folder is never taken for a backup.

A subclass provides the primitives (`_head`, `_upload`, `_download`, `_list`, `_delete_objects`,
`_put_bytes`, `_read_bytes`, `_shallow_problems`, `_error`) over full object names; this class maps keys
to names and implements the contract of `pgbeat.storage.base`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pgbeat.errors import StorageError
from pgbeat.fsutil import DIR_MODE, open_private, remove_path
from pgbeat.hashing import sha256_file
from pgbeat.storage.base import (
    Capabilities,
    Closing,
    HashingWriter,
    ObjectInfo,
    S,
    check_key,
    compare,
    counted,
    folder_files,
    mismatch,
    partial_name,
)

MARKER = ".pgbeat-folder.json"
MAX_PARTS = 10_000


@dataclass
class Remote:
    """One object as the store describes it; checksums are hex. `sha256` is the metadata pgbeat stored."""

    name: str
    size: int
    modified: datetime | None = None
    sha256: str | None = None
    md5: str | None = None
    crc32c: str | None = None
    extra: dict = field(default_factory=dict)


class ObjectExists(Exception):
    """The store refused a write because the object already exists (a failed no-clobber precondition)."""


class ObjectStore(Closing):
    name: str
    prefix: str
    _client_instance: Any = None  # the SDK's client, made on first use
    capabilities = Capabilities()  # objects carry checksums (S3: SHA-256, GCS: MD5 and CRC32C)

    def close(self) -> None:
        """Close the SDK client's connections (the next operation makes a new client)."""
        client, self._client_instance = self._client_instance, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    # --- primitives (subclasses) -------------------------------------------------------------------------

    def _head(self, name: str) -> Remote | None:
        raise NotImplementedError

    def _upload(self, source: Path, name: str, size: int, sha256: str, replace: bool = False) -> Remote:
        """Upload a local file to a new object `name` with `sha256` as metadata, in bounded parts; raise
        ObjectExists if it exists (unless `replace`: then the object is overwritten, atomically per object);
        check that the bytes sent hash to `sha256` before or as it completes."""
        raise NotImplementedError

    def _download(self, name: str, writer: HashingWriter) -> None:
        raise NotImplementedError

    def _list(self, prefix: str, recursive: bool) -> tuple[list[Remote], list[str]]:
        """Return the objects whose name starts with `prefix` (a prefix ending in `/`, or ""), and, unless
        recursive, the sub-prefixes one level down (each ending in `/`)."""
        raise NotImplementedError

    def _delete_objects(self, names: list[str]) -> None:
        """Delete objects; missing ones are not an error."""
        raise NotImplementedError

    def _put_bytes(self, name: str, data: bytes) -> None:
        """Store a small object, raising ObjectExists if it exists."""
        raise NotImplementedError

    def _read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def _shallow_problems(self, remote: Remote, sha256: str | None) -> list[str] | None:
        """Compare an object's checksum metadata with `sha256`: return the problems found, or None when the
        store knows nothing that can vouch for the content (the caller then reads it back)."""
        raise NotImplementedError

    def _error(self, exc: Exception, action: str, key: str) -> StorageError:
        """Translate an SDK exception into StorageError (TransientStorageError when retrying may help)."""
        raise NotImplementedError

    def describe(self, key: str) -> str:
        raise NotImplementedError

    # --- keys ----------------------------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        key = check_key(self.name, key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key(self, name: str) -> str:
        return name[len(self.prefix) + 1:] if self.prefix else name

    @contextlib.contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except ObjectExists:
            raise StorageError(f"{self.name}: refusing to overwrite existing {self.describe(key)}") from None
        except Exception as exc:
            raise self._error(exc, action, key) from None

    # --- contract ------------------------------------------------------------------------------------------

    def put(self, source: Path, key: str, sha256: str | None = None, *, replace: bool = False) -> ObjectInfo:
        """Store a file or a folder under a new `key` (see `pgbeat.storage.base`)."""
        name = self._name(key)
        source = Path(source)
        with self._errors("put", key):
            if self._head(f"{name}/{MARKER}") is not None or (
                    self._head(name) is not None and not (replace and not source.is_dir())):
                raise ObjectExists
            if source.is_dir():
                return self._put_folder(source, key, name)
            # The SHA-256 goes into the object's metadata, which must be set before the upload starts.
            expected = sha256.lower() if sha256 else sha256_file(source)
            size = source.stat().st_size
            remote = self._upload(source, name, size, expected, replace=replace)
        return self._info(key, remote)

    def _put_folder(self, source: Path, key: str, name: str) -> ObjectInfo:
        leftovers, _ = self._list(f"{name}/", recursive=True)
        if leftovers:  # an earlier put of this key was interrupted before its marker was written
            self._delete_objects([obj.name for obj in leftovers])
        files = []
        for relative, path in folder_files(source):
            remote = self._upload(path, f"{name}/{relative}", path.stat().st_size, sha256_file(path))
            files.append({"path": relative, "size": remote.size, "sha256": remote.sha256})
        total = sum(f["size"] for f in files)
        self._put_bytes(f"{name}/{MARKER}", json.dumps({"version": 1, "size": total, "files": files}).encode())
        marker = self._head(f"{name}/{MARKER}")
        return ObjectInfo(key=key, size=total, modified=marker.modified if marker else None)

    def get(self, key: str, dest: Path) -> None:
        """Download `key` to `dest` (a file, or a folder for a folder key), checking size and SHA-256."""
        name = self._name(key)
        dest = Path(dest)
        with self._errors("get", key):
            remote = self._head(name)
            if remote is not None:
                self._get_file(key, remote, dest)
                return
            folder = self._folder(name)
            if folder is None:
                raise StorageError(f"{self.name}: {self.describe(key)} does not exist")
            staged = partial_name(dest)
            remove_path(staged)
            staged.mkdir(mode=DIR_MODE, parents=True)
            try:
                for entry in folder["files"]:
                    target = staged / entry["path"]
                    target.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                    member = Remote(name=f"{name}/{entry['path']}", size=entry["size"], sha256=entry["sha256"])
                    self._get_file(f"{key}/{entry['path']}", member, target)
                if dest.exists():
                    raise StorageError(f"{self.name}: cannot restore {self.describe(key)}: {dest} exists")
                os.rename(staged, dest)
            finally:
                remove_path(staged)

    def load(self, key: str, open_sink: Callable[[], S]) -> S:
        """Stream the stored object `key` (a file, or a file of a folder) into a new sink."""
        name = self._name(key)
        with self._errors("load", key):
            if self._head(name) is None:
                raise StorageError(f"{self.name}: {self.describe(key)} does not exist")
            sink = open_sink()
            self._download(name, counted(sink))
        return sink

    def _get_file(self, key: str, remote: Remote, dest: Path) -> None:
        staged = partial_name(dest)
        try:
            with open_private(staged) as out:
                writer = HashingWriter(out)
                self._download(remote.name, writer)
                out.flush()
                os.fsync(out.fileno())
            problems = compare(writer.size, writer.hexdigest(), remote.size, remote.sha256)
            if problems:
                raise mismatch(self.describe(key), problems)
            os.replace(staged, dest)
        finally:
            staged.unlink(missing_ok=True)

    def stat(self, key: str) -> ObjectInfo | None:
        name = self._name(key)
        with self._errors("stat", key):
            remote = self._head(name)
            if remote is not None:
                return self._info(key, remote)
            marker = self._head(f"{name}/{MARKER}")
            if marker is None:
                return None
            folder = self._read_folder(name)
            return ObjectInfo(key=key, size=folder["size"], modified=marker.modified)

    def walk(self, prefix: str) -> list[ObjectInfo]:
        base = self._name(prefix) + "/"
        with self._errors("list", prefix):
            objects, _ = self._list(base, recursive=True)
        return sorted((self._info(self._key(obj.name), obj) for obj in objects if not obj.name.endswith(f"/{MARKER}")),
                      key=lambda info: info.key)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        clean = check_key(self.name, prefix, allow_empty=True)
        base = self._name(clean) + "/" if clean else (f"{self.prefix}/" if self.prefix else "")
        with self._errors("list", prefix or "/"):
            objects, subprefixes = self._list(base, recursive=False)
            infos = [self._info(self._key(obj.name), obj) for obj in objects
                     if not obj.name.endswith(f"/{MARKER}")]
            for sub in subprefixes:
                info = self.stat(self._key(sub.rstrip("/")))
                if info is not None:
                    infos.append(info)
        return sorted(infos, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        name = self._name(key)
        with self._errors("delete", key):
            self._delete_objects([name, f"{name}/{MARKER}"])
            members, _ = self._list(f"{name}/", recursive=True)
            if members:
                self._delete_objects([obj.name for obj in members])

    def verify(self, key: str, size: int, sha256: str | None, deep: bool = False) -> None:
        """Check the stored copy of `key` (see `pgbeat.storage.base`). For a folder, every file is checked
        against the size and SHA-256 in its marker, and the marker's total against `size`."""
        name = self._name(key)
        with self._errors("verify", key):
            remote = self._head(name)
            if remote is not None:
                problems = self._check(key, remote, size, sha256, deep)
            else:
                folder = self._folder(name)
                if folder is None:
                    raise StorageError(f"{self.name}: {self.describe(key)} does not exist")
                problems = compare(folder["size"], None, size, None)
                for entry in folder["files"]:
                    member_key = f"{key}/{entry['path']}"
                    member = self._head(f"{name}/{entry['path']}")
                    if member is None:
                        problems.append(f"{entry['path']} is missing")
                        continue
                    problems += [f"{entry['path']}: {p}"
                                 for p in self._check(member_key, member, entry["size"], entry["sha256"], deep)]
            if problems:
                raise mismatch(self.describe(key), problems)

    def _check(self, key: str, remote: Remote, size: int, sha256: str | None, deep: bool) -> list[str]:
        problems = compare(remote.size, None, size, None)
        if problems:
            return problems
        if not deep:
            if sha256 is None:
                return []
            shallow = self._shallow_problems(remote, sha256)
            if shallow is not None:
                return shallow
        with open(os.devnull, "wb") as sink:
            writer = HashingWriter(sink)
            self._download(remote.name, writer)
        return compare(writer.size, writer.hexdigest(), size, sha256)

    # --- helpers -------------------------------------------------------------------------------------------

    def _folder(self, name: str) -> dict | None:
        if self._head(f"{name}/{MARKER}") is None:
            return None
        return self._read_folder(name)

    def _read_folder(self, name: str) -> dict:
        try:
            folder = json.loads(self._read_bytes(f"{name}/{MARKER}"))
            assert isinstance(folder["files"], list) and isinstance(folder["size"], int)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise StorageError(f"{self.name}: the folder marker of {self._key(name)} is unreadable") from None
        return folder

    def _info(self, key: str, remote: Remote) -> ObjectInfo:
        return ObjectInfo(key=key, size=remote.size, modified=remote.modified, sha256=remote.sha256,
                          md5=remote.md5, crc32c=remote.crc32c)


def part_size_for(size: int, part_size: int) -> int:
    """Return a part size of at least `part_size` that splits `size` bytes into at most 10,000 parts."""
    needed = -(-size // MAX_PARTS)
    if needed <= part_size:
        return part_size
    mib = 1024 * 1024
    return -(-needed // mib) * mib
