"""Checking a stored copy against its manifest, built once above the backends.

A deep check reads every stored file back through `Storage.load` and compares its size and SHA-256 with
the ones the manifest recorded for it (`Manifest.stored_files`: every file of a directory-format backup,
or the one file of any other). It therefore catches one flipped byte in one file of a folder on any
backend, whether or not the destination keeps checksums of its own. A shallow check asks the backend
(`Storage.verify`): object metadata, or a hash computed on the remote host.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

from pgbeat.catalog.manifest import FileDigest, Manifest
from pgbeat.errors import StorageError
from pgbeat.storage.base import Storage, compare, mismatch

log = logging.getLogger(__name__)


class _Digest:
    """A sink that keeps only the size and SHA-256 of what it is given."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return len(data)


def member_key(key: str, file: FileDigest) -> str:
    """Given a backup's key and one of its stored files, return that file's key ("" names the key itself)."""
    return f"{key}/{file.name}" if file.name else key


def read_back(storage: Storage, key: str, files: Sequence[FileDigest]) -> list[str]:
    """Given a backup's key and its stored files, read each back from `storage` and return the differences
    from what was recorded, as phrases for a message (empty when every byte matches). Raise StorageError
    if the destination cannot be read (other than a missing file, which is a difference)."""
    problems = []
    for file in files:
        where = file.name or key
        stored = member_key(key, file)
        if storage.stat(stored) is None:
            problems.append(f"{where} is missing")
            continue
        digest = storage.load(stored, _Digest)
        problems += [f"{where}: {p}" for p in compare(digest.size, digest.sha256.hexdigest(), file.size, file.sha256)]
    return problems


def verify_copy(storage: Storage, key: str, manifest: Manifest, deep: bool = False) -> None:
    """Given the key of a copy at `storage` and the manifest it was stored with, check it: shallow (the
    backend's metadata check of size and SHA-256) or, with `deep` (or on a backend whose shallow check reads
    the data anyway: `Capabilities.shallow_reads_back`), by reading every stored file back and comparing it
    with the manifest's per-file SHA-256. Raise StorageError if the copy is missing, damaged
    or unreadable. A manifest without per-file hashes (older pgbeat) is checked as before, with a warning."""
    files = manifest.stored_files()
    # Where a shallow check reads the data anyway, comparing each file with the manifest costs nothing more.
    read_back_files = deep or storage.capabilities.shallow_reads_back
    if not read_back_files or not files:
        if deep and not files:
            log.warning("%s: the manifest of %s records no per-file SHA-256 (an older pgbeat wrote it): the "
                        "copy is checked by the destination's means only", storage.name, key)
        storage.verify(key, manifest.size, None if manifest.files else manifest.sha256, deep=deep)
        return
    if storage.stat(key) is None:
        raise StorageError(f"{storage.name}: {storage.describe(key)} does not exist")
    problems = read_back(storage, key, files)
    if problems:
        raise mismatch(storage.describe(key), problems)
