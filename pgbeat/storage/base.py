"""The storage contract every destination implements.

Keys are relative, `/`-separated paths such as `daily/erp_backup_daily_20251119_020000.sql.gz`.
Contract (what callers may rely on):
- `put` stores a local file, or a folder (directory-format dumps), under `key` so that the key appears
  whole or not at all, and never replaces an existing key. It streams: nothing is read whole into memory.
- `get` writes the object to a local path; `stat` returns None for a missing key; `list` returns the
  objects under a prefix; `delete` of a missing key is not an error (deleting twice is idempotent).
- Failures raise `pgbeat.errors.StorageError` with a message naming the destination and the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime | None = None


class Storage(Protocol):
    name: str

    def put(self, source: Path, key: str) -> ObjectInfo: ...

    def get(self, key: str, dest: Path) -> None: ...

    def stat(self, key: str) -> ObjectInfo | None: ...

    def list(self, prefix: str = "") -> list[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...

    def describe(self, key: str) -> str:
        """Return where `key` lives, for messages and manifests (a path or a URL, without secrets)."""
        ...
