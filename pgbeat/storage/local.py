"""The local destination: `BACKUP_ROOT/<tier>/<name>`, files 0600 and folders 0700."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

from pgbeat.errors import StorageError
from pgbeat.fsutil import DIR_MODE, FILE_MODE, disk_error, private_dir, publish, remove_path, tree_size
from pgbeat.storage.base import ObjectInfo


class LocalStorage:
    """A folder on this host. `put` from the same file system is a rename, so publishing is atomic."""

    def __init__(self, root: Path, name: str = "local") -> None:
        self.root = Path(root)
        self.name = name

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise StorageError(f"{self.name}: key {key!r} points outside {self.root}")
        return path

    def describe(self, key: str) -> str:
        return str(self.path(key))

    def put(self, source: Path, key: str) -> ObjectInfo:
        final = self.path(key)
        private_dir(final.parent)
        if final.exists():
            raise StorageError(f"{self.name}: refusing to overwrite existing {final}")
        try:
            if os.stat(source).st_dev == os.stat(final.parent).st_dev:
                staged = source
            else:  # another file system: copy under a hidden name first, then publish it
                staged = final.with_name(f".{final.name}.partial")
                remove_path(staged)
                if source.is_dir():
                    shutil.copytree(source, staged)
                else:
                    shutil.copyfile(source, staged)
            _tighten(staged)
            publish(staged, final)
        except OSError as exc:
            raise disk_error(exc, final) from None
        return self.stat(key)  # type: ignore[return-value]

    def get(self, key: str, dest: Path) -> None:
        source = self.path(key)
        if not source.exists():
            raise StorageError(f"{self.name}: {key} does not exist")
        if source.is_dir():
            shutil.copytree(source, dest)
        else:
            shutil.copyfile(source, dest)

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
            info = self.stat(entry.relative_to(self.root).as_posix())
            if info is not None:
                infos.append(info)
        return infos

    def delete(self, key: str) -> None:
        remove_path(self.path(key))


def _tighten(path: Path) -> None:
    """Make a file 0600, or a folder tree 0700/0600, before it gets its final name."""
    if path.is_dir():
        os.chmod(path, DIR_MODE)
        for child in path.rglob("*"):
            os.chmod(child, DIR_MODE if child.is_dir() else FILE_MODE)
    else:
        os.chmod(path, FILE_MODE)
