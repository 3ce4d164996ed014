"""Hashing of local files: the one place a file is read to be hashed.

Streams being transferred are hashed as they pass (`pgbeat.storage.base.HashingReader` and
`HashingWriter`, the compressors and the encryptor); a file at rest is hashed here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pgbeat.fsutil import CHUNK


def hash_file(path: Path, algorithm: str = "sha256") -> tuple[str, int]:
    """Given a local file, return its digest (hex) under `algorithm` and its size in bytes, read in CHUNKs.
    Raise OSError if it cannot be read."""
    digest, size = hashlib.new(algorithm, usedforsecurity=algorithm != "md5"), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def sha256_file(path: Path) -> str:
    """Given a local file, return its SHA-256 (hex). Raise OSError if it cannot be read."""
    return hash_file(path, "sha256")[0]
