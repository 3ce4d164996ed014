"""The catalog: what a backup is, what its manifest records, and where backups are on the shelf.

A backup `BACKUP_ROOT/<tier>/<target>_backup_<tier>_<YYYYMMDD_HHMMSS><ext>` has two sidecars:
`<name>.manifest.json` (this module's `Manifest`) and `<name>.sha256` (`sha256sum -c` compatible).
The manifest is what makes a file pgbeat's: rotation and listing ignore anything without one.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pgbeat.fsutil import write_atomic

MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"
CHECKSUM_SUFFIX = ".sha256"
STAMP_FORMAT = "%Y%m%d_%H%M%S"
NAME_RE = re.compile(r"^(?P<target>.+)_backup_(?P<tier>daily|weekly|monthly)_(?P<stamp>\d{8}_\d{6})(?P<ext>\..+)$")


def extension(dump_format: str, codec: str) -> str:
    """Return the file extension of a backup: `.sql.gz` for the seed's default."""
    if dump_format == "custom":
        return ".dump"
    if dump_format == "directory":
        return ".dir"
    return {"gzip": ".sql.gz", "zstd": ".sql.zst", "none": ".sql"}[codec]


def backup_name(target: str, tier: str, stamp: str, ext: str) -> str:
    return f"{target}_backup_{tier}_{stamp}{ext}"


def parse_name(name: str) -> dict[str, str] | None:
    match = NAME_RE.match(name)
    return match.groupdict() if match else None


def manifest_path(backup: Path) -> Path:
    return backup.with_name(backup.name + MANIFEST_SUFFIX)


def checksum_path(backup: Path) -> Path:
    return backup.with_name(backup.name + CHECKSUM_SUFFIX)


class FileDigest(BaseModel):
    """Size and checksums of one stored file (a directory-format backup has one per file)."""

    name: str
    size: int
    md5: str
    sha256: str


class Manifest(BaseModel):
    """Everything known about one backup; written by verify, completed by upload, read by everything."""

    model_config = ConfigDict(extra="allow")

    pgbeat_manifest: int = MANIFEST_VERSION
    run_id: str
    target: str
    tier: str
    file: str
    format: str
    codec: str
    level: int | None = None
    status: str = "verified"
    size: int
    md5: str | None = None
    sha256: str | None = None
    files: list[FileDigest] = Field(default_factory=list, description="per file, directory format only")
    raw_size: int | None = Field(None, description="bytes pg_dump wrote (plain format)")
    raw_crc32: str | None = None
    complete: bool = Field(description="pg_dump exited 0 and (plain) wrote its closing line")
    server_version: str | None = None
    pg_dump_version: str | None = None
    database: dict[str, Any] = Field(default_factory=dict, description="dbname, host, port (no secrets)")
    tables: dict[str, int] = Field(default_factory=dict, description="rows per table, counted from the dump")
    started_at: datetime
    finished_at: datetime | None = None
    duration_s: float | None = None
    steps: dict[str, dict[str, Any]] = Field(default_factory=dict)
    node: str | None = None
    slot: str | None = Field(None, description="the scheduled slot this backup served (beat runs)")
    copies: dict[str, dict[str, Any]] = Field(default_factory=dict)
    drills: list[dict[str, Any]] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    encryption: dict[str, Any] | None = Field(None, description="age recipients and the plaintext's checksums")

    def checksum_lines(self) -> str:
        """Return the `.sha256` file's text: `sha256sum -c` checks it from the backup's folder."""
        if self.files:
            return "".join(f"{f.sha256}  {self.file}/{f.name}\n" for f in self.files)
        return f"{self.sha256}  {self.file}\n"


def write_manifest(path: Path, manifest: Manifest) -> None:
    write_atomic(path, manifest.model_dump_json(indent=2).encode() + b"\n")


def manifest_lock_path(manifest: Path) -> Path:
    return manifest.with_name(f".{manifest.name}.lock")


def update_manifest(path: Path, change: Callable[[Manifest], None]) -> Manifest:
    """Apply `change` to the manifest at `path` under an exclusive lock and write it back atomically."""
    fd = os.open(manifest_lock_path(path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        manifest = read_manifest(path)
        if manifest is None:
            raise FileNotFoundError(f"no pgbeat manifest at {path}")
        change(manifest)
        write_manifest(path, manifest)
        return manifest
    finally:
        os.close(fd)


def read_manifest(path: Path) -> Manifest | None:
    """Return the manifest at `path`, or None if it is missing, unreadable or not pgbeat's."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("pgbeat_manifest") != MANIFEST_VERSION:
        return None
    try:
        return Manifest.model_validate(data)
    except ValueError:
        return None


ATTEMPTS_FILE = Path(".state") / "attempts.json"


def record_attempt(backup_root: Path, target: str, tier: str, attempt: dict[str, Any]) -> None:
    """Remember the last attempt per target and tier (success or failure) for status and metrics."""
    path = backup_root / ATTEMPTS_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.with_name(".attempts.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        attempts = read_attempts(backup_root)
        attempts[f"{target}/{tier}"] = attempt
        write_atomic(path, json.dumps(attempts, indent=1, sort_keys=True).encode())
    finally:
        os.close(fd)


def read_attempts(backup_root: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((backup_root / ATTEMPTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class Entry(BaseModel):
    """A backup on the local shelf: its path and its manifest."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    path: Path
    manifest: Manifest

    @property
    def exists(self) -> bool:
        return self.path.exists()

    @property
    def verified(self) -> bool:
        return self.manifest.status == "verified" and self.manifest.complete


def iter_manifests(backup_root: Path, tiers: tuple[str, ...] = ("daily", "weekly", "monthly")) -> Iterator[Entry]:
    """Yield an Entry per pgbeat manifest under the tier folders (whether or not its data file exists)."""
    for tier in tiers:
        folder = backup_root / tier
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in sorted(names):
            if not name.endswith(MANIFEST_SUFFIX):
                continue
            manifest = read_manifest(folder / name)
            data_name = name.removesuffix(MANIFEST_SUFFIX)
            if manifest is None or manifest.file != data_name or manifest.tier != tier:
                continue
            yield Entry(path=folder / data_name, manifest=manifest)


def iter_pre_restore(backup_root: Path) -> Iterator[Entry]:
    """Yield the safety backups a restore took (`BACKUP_ROOT/pre_restore_*`); rotation never touches them."""
    try:
        names = sorted(os.listdir(backup_root))
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith("pre_restore_") and name.endswith(MANIFEST_SUFFIX):
            manifest = read_manifest(backup_root / name)
            if manifest is not None and manifest.file == name.removesuffix(MANIFEST_SUFFIX):
                yield Entry(path=backup_root / manifest.file, manifest=manifest)


def list_backups(backup_root: Path, target: str | None = None, tier: str | None = None,
                 include_pre_restore: bool = False) -> list[Entry]:
    """Return the backups on the shelf (data file present), oldest first."""
    found = list(iter_manifests(backup_root, (tier,) if tier else ("daily", "weekly", "monthly")))
    if include_pre_restore and tier is None:
        found += iter_pre_restore(backup_root)
    entries = [e for e in found if e.exists and (target is None or e.manifest.target == target)]
    return sorted(entries, key=lambda e: (e.manifest.started_at, e.path.name))


def find_backup(path: Path) -> Entry | None:
    """Given a backup file's path, return its Entry if a pgbeat manifest stands next to it."""
    manifest = read_manifest(manifest_path(path))
    if manifest is None or manifest.file != path.name:
        return None
    return Entry(path=path, manifest=manifest)
