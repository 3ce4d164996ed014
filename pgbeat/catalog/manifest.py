"""The catalog: what a backup is, what its manifest records, and where backups are on the shelf.

A backup `BACKUP_ROOT/<tier>/<target>_backup_<tier>_<YYYYMMDD_HHMMSS><ext>` has two sidecars:
`<name>.manifest.json` (this module's `Manifest`) and `<name>.sha256` (`sha256sum -c` compatible).
The manifest is what makes a file pgbeat's: rotation and listing ignore anything without one.

A backup's point in time (`Manifest.taken_at`) is the database server's clock when its dump started, not
the clock of the worker that ran it: "latest", retention and the freshness metrics all order backups by
it (`order_key`, `newest`), so a worker whose clock is years off cannot make its backup "latest" forever
or make rotation delete the others. A backup dated after "now" (beyond `FUTURE_TOLERANCE`) was made
under a wrong clock: it is flagged, never "latest" while others exist, and never removed by age.

A manifest carries a seal, the SHA-256 of its fields except the annotations pgbeat adds later
(`UNSEALED`): verify, restore and drills refuse a manifest whose seal does not match (damaged or edited
by hand), so they agree on what a damaged manifest means (pgBackRest seals its manifests the same way).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pgbeat.fsutil import write_atomic

MANIFEST_VERSION = 2  # 2: sealed, with the server's clock; 1 (unsealed) is still read
READABLE_VERSIONS = (1, MANIFEST_VERSION)
MANIFEST_SUFFIX = ".manifest.json"
CHECKSUM_SUFFIX = ".sha256"
STAMP_FORMAT = "%Y%m%d_%H%M%S"
NAME_RE = re.compile(r"^(?P<target>.+)_backup_(?P<tier>daily|weekly|monthly)_(?P<stamp>\d{8}_\d{6})(?P<ext>\..+)$")
# A backup dated more than this after "now" was made under a wrong clock ("from the future").
FUTURE_TOLERANCE = timedelta(minutes=5)
# Fields pgbeat annotates after the verify step wrote the manifest, or that no check depends on: they
# are outside the seal, so recording a drill or a copy never needs the rest to be re-proven.
UNSEALED = frozenset({"seal", "run_id", "level", "server_version", "pg_dump_version", "database", "finished_at",
                      "duration_s", "steps", "node", "slot", "copies", "drills", "warnings"})


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


# The kinds of warning a backup can carry; monitoring and status decide by kind, never by the text.
WARNING_KINDS = {
    "size-drop": "much smaller than the previous backups of its target and tier",
    "tables-gone": "tables of the previous backup are missing",
    "slow": "much slower than the previous backups",
    "clock": "the worker's clock was far from the database server's, or the server's was not read",
    "disk": "BACKUP_ROOT is running out of space",
    "rotate": "what the rotate step reported (backups dated in the future, removals that failed)",
    "other": "a warning of an older manifest, from before warnings had a kind",
}
# How a manifest of version 2 or older spelled the warnings that status tells apart (upgrade only).
_OLD_WARNING_TEXTS = {"was data lost?": "size-drop", "of the previous backup are missing": "tables-gone"}


class BackupWarning(BaseModel):
    """Something about a backup that is not a failure but should worry a DBA."""

    kind: str = Field(description="one of WARNING_KINDS")
    text: str

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        if kind not in WARNING_KINDS:
            raise ValueError(f"unknown warning kind {kind!r}")
        return kind


class DrillRecord(BaseModel):
    """One restore drill of a backup: when, how it went, what was checked."""

    model_config = ConfigDict(extra="allow")

    status: str = Field(description='"passed" or "failed"')
    at: str = Field(description="when the drill started (ISO 8601, with its zone)")
    duration_s: float
    restore_s: float | None = None
    server: str = ""
    checks: list[str] = Field(default_factory=list, description="what was checked and how it went")
    problems: list[str] = Field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def upgrade_warning(value: Any) -> Any:
    """Given a warning as a manifest of any version holds it, return it as a BackupWarning's fields."""
    if isinstance(value, str):
        kind = next((k for text, k in _OLD_WARNING_TEXTS.items() if text in value), "other")
        return {"kind": kind, "text": value}
    return value


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
    started_at: datetime = Field(description="the run's start by the worker's clock (the file name's stamp)")
    server_time: datetime | None = Field(None, description="the database server's clock when the dump started: "
                                                           "the backup's point in time")
    clock_skew_s: float | None = Field(None, description="the worker's clock minus the server's, at the dump")
    finished_at: datetime | None = None
    duration_s: float | None = None
    steps: dict[str, dict[str, Any]] = Field(default_factory=dict)
    node: str | None = None
    slot: str | None = Field(None, description="the scheduled slot this backup served (beat runs)")
    copies: dict[str, dict[str, Any]] = Field(default_factory=dict)
    drills: list[DrillRecord] = Field(default_factory=list)
    warnings: list[BackupWarning] = Field(default_factory=list)
    encryption: dict[str, Any] | None = Field(None, description="age recipients and the plaintext's checksums")
    seal: str | None = Field(None, description="SHA-256 of the sealed fields (all but UNSEALED)")

    @field_validator("warnings", mode="before")
    @classmethod
    def _upgrade_warnings(cls, value: Any) -> Any:
        return [upgrade_warning(v) for v in value] if isinstance(value, list) else value

    @property
    def taken_at(self) -> datetime:
        """The backup's point in time: the server's clock at the dump (old manifests: the worker's start)."""
        return self.server_time or self.started_at

    @property
    def completed_at(self) -> datetime:
        """When the backup was complete, by the server's clock where the worker's offset from it is known."""
        end = self.finished_at or self.started_at
        if self.server_time is not None and self.clock_skew_s is not None:
            return end - timedelta(seconds=self.clock_skew_s)
        return end

    def computed_seal(self) -> str:
        """Return the SHA-256 of the sealed fields, as canonical JSON."""
        sealed = self.model_dump(mode="json", include=set(type(self).model_fields) - UNSEALED)
        text = json.dumps(sealed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def seal_problem(self) -> str | None:
        """Return why this manifest's seal does not hold, or None (old, unsealed versions have none to hold)."""
        if self.pgbeat_manifest < 2:
            return None
        if self.seal is None:
            return "the manifest has no seal"
        if self.seal != self.computed_seal():
            return "the manifest does not match its seal: it was damaged or edited after the backup was verified"
        return None

    def record_drill(self, drill: DrillRecord) -> None:
        """Add a drill of this backup (outside the seal: the backup's own fields need no new proof)."""
        self.drills.append(drill)

    @property
    def last_drill(self) -> DrillRecord | None:
        return self.drills[-1] if self.drills else None

    def checksum_lines(self) -> str:
        """Return the `.sha256` file's text: `sha256sum -c` checks it from the backup's folder."""
        if self.files:
            return "".join(f"{f.sha256}  {self.file}/{f.name}\n" for f in self.files)
        return f"{self.sha256}  {self.file}\n"


def write_manifest(path: Path, manifest: Manifest, reseal: bool = True) -> None:
    """Write `manifest` to `path` atomically, sealed afresh unless `reseal` is False."""
    if reseal:
        manifest.pgbeat_manifest = MANIFEST_VERSION
        manifest.seal = manifest.computed_seal()
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
        intact = manifest.pgbeat_manifest == MANIFEST_VERSION and manifest.seal_problem() is None
        change(manifest)
        # A damaged manifest keeps its broken seal: recording a drill must not launder the damage.
        write_manifest(path, manifest, reseal=intact)
        return manifest
    finally:
        os.close(fd)


def read_manifest(path: Path) -> Manifest | None:
    """Return the manifest at `path`, or None if it is missing, unreadable or not pgbeat's."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("pgbeat_manifest") not in READABLE_VERSIONS \
            or isinstance(data.get("pgbeat_manifest"), bool):
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


class Dated(Protocol):
    """A local Entry or a destination's RemoteEntry: what ordering needs of a backup."""

    path: Any
    manifest: Manifest


D = TypeVar("D", bound=Dated)


def order_key(entry: Dated) -> tuple[datetime, str]:
    """The one order of backups, oldest first: by point in time (the server's clock), then by name."""
    return entry.manifest.taken_at, Path(entry.path).name


def from_the_future(entry: Dated, now: datetime) -> bool:
    """True when `entry` is dated after `now` by more than FUTURE_TOLERANCE (made under a wrong clock)."""
    return entry.manifest.taken_at > now + FUTURE_TOLERANCE


def newest(entries: Iterable[D], now: datetime) -> D | None:
    """Given backups, return the newest by `order_key` that is not from the future at `now`: one dated in
    the future is "latest" only when nothing else is there. None if there are none."""
    ordered = sorted(entries, key=order_key)
    settled = [e for e in ordered if not from_the_future(e, now)]
    return (settled or ordered)[-1] if ordered else None


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
    """Return the backups on the shelf (data file present), oldest first (`order_key`)."""
    found = list(iter_manifests(backup_root, (tier,) if tier else ("daily", "weekly", "monthly")))
    if include_pre_restore and tier is None:
        found += iter_pre_restore(backup_root)
    entries = [e for e in found if e.exists and (target is None or e.manifest.target == target)]
    return sorted(entries, key=order_key)


def find_backup(path: Path) -> Entry | None:
    """Given a backup file's path, return its Entry if a pgbeat manifest stands next to it."""
    manifest = read_manifest(manifest_path(path))
    if manifest is None or manifest.file != path.name:
        return None
    return Entry(path=path, manifest=manifest)
