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
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer

from pgbeat.errors import PgbeatError
from pgbeat.fsutil import private_dir, write_atomic
from pgbeat.settings.rules import PHYSICAL_TIERS, RESERVED_TIER_NAMES, TIER_NAME_RE, TIERS

MANIFEST_VERSION = 2  # 2: sealed, with the server's clock; 1 (unsealed) is still read
READABLE_VERSIONS = (1, MANIFEST_VERSION)
MANIFEST_SUFFIX = ".manifest.json"
CHECKSUM_SUFFIX = ".sha256"
STAMP_FORMAT = "%Y%m%d_%H%M%S"
NAME_RE = re.compile(rf"^(?P<target>.+)_backup_(?P<tier>{TIER_NAME_RE.pattern[1:-1]})_(?P<stamp>\d{{8}}_\d{{6}})"
                     r"(?P<ext>\..+)$")
# A backup dated more than this after "now" was made under a wrong clock ("from the future").
FUTURE_TOLERANCE = timedelta(minutes=5)
# Fields pgbeat annotates after the verify step wrote the manifest, or that no check depends on: they
# are outside the seal, so recording a drill or a copy never needs the rest to be re-proven.
UNSEALED = frozenset({"seal", "run_id", "level", "server_version", "pg_dump_version", "database", "finished_at",
                      "duration_s", "steps", "node", "slot", "copies", "drills", "warnings", "pinned"})

# Sealed fields added after version 2's seal: sealed only when set, so that older seals still hold.
SEALED_WHEN_SET = ("physical", "globals", "chain", "properties")
# The extension of a backup's globals file comes after this mark: `<stem>.globals.sql.gz[.age]`.
GLOBALS_MARK = ".globals"


def extension(dump_format: str, codec: str) -> str:
    """Return the file extension of a backup: `.sql.gz` for the seed's default."""
    if dump_format == "custom":
        return ".dump"
    if dump_format == "directory":
        return ".dir"
    if dump_format == "tar":  # a physical base backup: pg_basebackup's tar, compressed by pgbeat
        return {"gzip": ".tar.gz", "zstd": ".tar.zst", "none": ".tar"}[codec]
    return {"gzip": ".sql.gz", "zstd": ".sql.zst", "none": ".sql"}[codec]


def backup_name(target: str, tier: str, stamp: str, ext: str) -> str:
    return f"{target}_backup_{tier}_{stamp}{ext}"


def parse_name(name: str) -> dict[str, str] | None:
    match = NAME_RE.match(name)
    return match.groupdict() if match else None


def globals_name(backup: str, globals_file: str) -> str:
    """Given a backup's file name and its globals file's (of any name), return the globals file's name beside
    that backup: the backup's stem with the globals' extension (`X.sql.gz` -> `X.globals.sql.gz`)."""
    backup_parts, globals_parts = parse_name(backup), parse_name(globals_file)
    assert backup_parts is not None and globals_parts is not None, (backup, globals_file)
    return backup.removesuffix(backup_parts["ext"]) + globals_parts["ext"]


def new_globals_name(backup: str, codec: str) -> str:
    """The name of the globals file made beside backup `backup`, compressed with `codec`."""
    return globals_name(backup, backup_name("x", "daily", "00000000_000000", GLOBALS_MARK + extension("plain", codec)))


def is_globals_name(name: str) -> bool:
    """Whether `name` is a backup's globals file (never a backup of its own)."""
    parts = parse_name(name)
    return parts is not None and parts["ext"].startswith(GLOBALS_MARK + ".")


def manifest_path(backup: Path) -> Path:
    return backup.with_name(backup.name + MANIFEST_SUFFIX)


def checksum_path(backup: Path) -> Path:
    return backup.with_name(backup.name + CHECKSUM_SUFFIX)


class FileDigest(BaseModel):
    """Size and checksums of one stored file (a directory-format backup has one per file)."""

    name: str
    size: int
    md5: str | None = None
    sha256: str


# The kinds of warning a backup can carry; monitoring and status decide by kind, never by the text.
WARNING_KINDS = {
    "size-drop": "much smaller than the previous backups of its target and tier",
    "tables-gone": "tables of the previous backup are missing",
    "slow": "much slower than the previous backups",
    "clock": "the worker's clock was far from the database server's, or the server's was not read",
    "disk": "BACKUP_ROOT is running out of space",
    "empty": "the database had no tables: the backup holds no data",
    "rotate": "what the rotate step reported (backups dated in the future, removals that failed)",
    "standby": "the standby it prefers could not be used: the backup was taken from the primary",
    "globals": "the server's globals were dumped without role passwords, or could not be dumped",
    "incremental": "the base tier asks for incremental base backups, but this one had to be full",
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


COPY_STATES = ("ok", "pending", "failed", "skipped")


class PhysicalInfo(BaseModel):
    """What a physical base backup needs for point-in-time recovery: where its WAL starts and ends.

    Recovery from it replays WAL from `start_lsn` (segment `start_wal`) on `timeline`; it is consistent
    once `end_lsn` is replayed, so it serves recovery targets after its `stop_time`.
    """

    timeline: int
    start_lsn: str
    end_lsn: str
    start_wal: str | None = Field(None, description="the WAL segment file where replay starts")
    start_time: datetime | None = Field(None, description="START TIME of backup_label (the server's clock)")
    stop_time: datetime | None = Field(None, description="when the backup was consistent (the server's clock)")
    client_version: str | None = Field(None, description="pg_basebackup's version")


CHAIN_KINDS = ("full", "incremental")


class ChainInfo(BaseModel):
    """Where a base backup stands in a chain of incremental base backups (PostgreSQL 17 and later).

    A full one (`kind` "full") restores alone and is the root of the incrementals taken after it; an
    incremental one (`pg_basebackup --incremental`) holds only what changed since its `parent`, and restores
    only with every backup from the chain's `root` down to it, combined by `pg_combinebackup`. The parent is
    named by its file on the shelf and its stored SHA-256, so a restore takes exactly that parent, never
    another backup of the same name.
    """

    kind: str = Field("full", description="full or incremental")
    parent: str | None = Field(None, description="the file of the backup this one is incremental to")
    parent_sha256: str | None = Field(None, description="the SHA-256 that parent's manifest records")
    root: str | None = Field(None, description="the full base backup at the start of the chain")
    depth: int = Field(0, ge=0, description="how many incrementals lead from the root to this one (0: full)")

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        if kind not in CHAIN_KINDS:
            raise ValueError(f"unknown chain kind {kind!r}; one of {', '.join(CHAIN_KINDS)}")
        return kind

    @property
    def incremental(self) -> bool:
        return self.kind == "incremental"


class GlobalsInfo(BaseModel):
    """The globals of the backup's database server (`pg_dumpall --globals-only`: roles, memberships, role
    settings, tablespaces), stored beside a logical backup as a file of its own (`globals_name`).

    Encrypted like the backup (`encryption` of the target): then `plaintext_sha256` is what decrypts.
    """

    file: str
    size: int
    sha256: str
    passwords: bool = Field(description="role passwords included (the backup user was a superuser)")
    roles: list[str] = Field(default_factory=list, description="the roles the file creates")
    used_roles: list[str] = Field(default_factory=list, description="the roles that own objects of the database "
                                                                    "or hold grants on them: a restore needs them")
    encrypted: bool = False
    plaintext_sha256: str | None = None
    plaintext_size: int | None = None


class Copy(BaseModel):
    """One copy of a backup: on the local shelf (under the name "local") or at a destination.

    "ok": stored and checked where it landed; "pending": an encrypted copy about to be stored (what it
    will be, so that a rerun can check an upload that landed before an interruption); "failed": the last
    attempt failed (`error`); "skipped": it cannot go there (`reason`).
    """

    model_config = ConfigDict(extra="allow")

    status: str = Field(description="one of COPY_STATES")
    location: str | None = Field(None, description="where it is: a path or a destination's URL")
    stored_at: str | None = None
    at: str | None = Field(None, description="when the state was recorded (pending, failed, skipped)")
    verified: str | None = Field(None, description="how it was checked where it landed")
    file: str | None = Field(None, description="the stored file's name, where it differs (encrypted on the way)")
    encrypted: bool | None = None
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    error: str | None = None
    reason: str | None = None

    @field_validator("status")
    @classmethod
    def _known(cls, status: str) -> str:
        if status not in COPY_STATES:
            raise ValueError(f"unknown copy state {status!r}")
        return status

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A copy records only what applies to its state; the manifest does not spell out the rest as null.
        return {k: v for k, v in handler(self).items() if v is not None}

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class PlaintextDigest(BaseModel):
    """The backup before encryption: its name, size and checksums (what a decryption must give back)."""

    model_config = ConfigDict(extra="allow")

    file: str
    size: int
    sha256: str | None
    md5: str | None


class EncryptionInfo(BaseModel):
    """How a backup was encrypted: for whom, and what plaintext it holds."""

    model_config = ConfigDict(extra="allow")

    scheme: str = "age"
    recipients: list[str]
    plaintext: PlaintextDigest


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
    warnings: list[str] = Field(default_factory=list, description="what a passed drill could not prove")

    @property
    def passed(self) -> bool:
        return self.status == "passed"


class PinRecord(BaseModel):
    """A backup kept whatever its tier's retention says, until unpinned (`pgbeat pin`)."""

    at: str = Field(description="when it was pinned (ISO 8601, with its zone)")
    note: str = Field("", description="why, in the DBA's words")


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
    copies: dict[str, Copy] = Field(default_factory=dict)
    drills: list[DrillRecord] = Field(default_factory=list)
    pinned: PinRecord | None = Field(None, description="kept by every rotation until unpinned")
    warnings: list[BackupWarning] = Field(default_factory=list)
    encryption: EncryptionInfo | None = Field(None, description="age recipients and the plaintext's checksums")
    physical: PhysicalInfo | None = Field(None, description="a base backup (tier base): its WAL range")
    globals: GlobalsInfo | None = Field(None, description="the server's globals file beside a logical backup")
    chain: ChainInfo | None = Field(None, description="a base backup: full, or incremental to which parent")
    properties: dict[str, Any] | None = Field(None, description="a logical backup: its database's own properties "
                                                                "at the dump (owner, encoding, locale, settings, "
                                                                "ACL, comment; pgbeat.postgres.database), given to "
                                                                "a database a restore creates")
    seal: str | None = Field(None, description="SHA-256 of the sealed fields (all but UNSEALED)")

    @field_validator("pgbeat_manifest", mode="before")
    @classmethod
    def _readable_version(cls, value: Any) -> Any:
        if isinstance(value, bool) or value not in READABLE_VERSIONS:  # JSON's true would read as 1
            raise ValueError(f"not a manifest version this pgbeat reads ({', '.join(map(str, READABLE_VERSIONS))})")
        return value

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
        for key in SEALED_WHEN_SET:  # fields newer than the seal: absent from the seals made before them
            if sealed.get(key) is None:
                sealed.pop(key, None)
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

    def copy_at(self, destination: str) -> Copy | None:
        """The copy recorded for `destination` ("local" for the shelf), or None."""
        return self.copies.get(destination)

    def has_good_copy(self, destination: str) -> bool:
        copy = self.copies.get(destination)
        return copy is not None and copy.ok

    def good_copies(self) -> list[str]:
        """The places that hold a checked copy of this backup: "local" (the shelf, where it is read from)
        and each destination whose copy is "ok"; a copy that failed, is pending or was skipped is not kept."""
        return sorted({"local", *(d for d, c in self.copies.items() if c.ok)})

    def record_copy(self, destination: str, copy: Copy) -> None:
        """Record the state of the copy at `destination` (outside the seal), replacing the one before."""
        self.copies[destination] = copy

    def encrypted_as(self, name: str, size: int, sha256: str, md5: str | None, recipients: list[str]) -> Manifest:
        """Return the manifest of this backup encrypted for `recipients` into file `name` (of that size and
        checksums): what is stored, with this backup's own file as its plaintext."""
        return self.model_copy(deep=True, update={
            "file": name, "size": size, "sha256": sha256, "md5": md5,
            "encryption": EncryptionInfo(recipients=recipients, plaintext=PlaintextDigest(
                file=self.file, size=self.size, sha256=self.sha256, md5=self.md5))})

    def publish_as(self, name: str, location: str, at: str) -> None:
        """Give this backup its final file name on the shelf, at `location` (the shelf's copy, "local")."""
        self.file = name
        if self.globals is not None:
            self.globals.file = globals_name(name, self.globals.file)
        self.record_copy("local", Copy(status="ok", location=location, stored_at=at))

    def record_warnings(self, warnings: list[BackupWarning]) -> None:
        """Set what the run found worrying about this backup (outside the seal)."""
        self.warnings = list(warnings)

    def record_drill(self, drill: DrillRecord) -> None:
        """Add a drill of this backup (outside the seal: the backup's own fields need no new proof)."""
        self.drills.append(drill)

    @property
    def last_drill(self) -> DrillRecord | None:
        return self.drills[-1] if self.drills else None

    def stored_files(self) -> list[FileDigest]:
        """Return every file this backup is stored as, with its size and checksums: a directory-format
        backup's files (names relative to its folder), any other backup as a list of one named "" (the
        backup's own key). Empty for a manifest that records no SHA-256 (written by an older pgbeat)."""
        if self.files:
            return list(self.files)
        if self.sha256 is None or self.format == "directory":
            return []
        return [FileDigest(name="", size=self.size, md5=self.md5, sha256=self.sha256)]

    def checksum_lines(self) -> str:
        """Return the `.sha256` file's text: `sha256sum -c` checks it from the backup's folder."""
        extra = f"{self.globals.sha256}  {self.globals.file}\n" if self.globals is not None else ""
        if self.files:
            return "".join(f"{f.sha256}  {self.file}/{f.name}\n" for f in self.files) + extra
        return f"{self.sha256}  {self.file}\n" + extra


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


def read_manifest(path: Path | str) -> Manifest | None:
    """Return the manifest at `path`, or None if it is missing, unreadable or not pgbeat's."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    try:
        manifest = Manifest.model_validate_json(raw)  # one pass: a fleet's status reads thousands
    except ValueError:
        return None
    # The version must be written, not defaulted: a JSON file without it is not pgbeat's manifest.
    return manifest if "pgbeat_manifest" in manifest.model_fields_set else None


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


CONFIGURED_FILE = Path(".state") / "configured.json"


def first_configured(backup_root: Path, keys: Iterable[str], now: datetime) -> dict[str, datetime]:
    """Return when each of `keys` ("<target>/<tier>", "drill/<target>") was first seen in the configuration,
    recording `now` for the keys seen for the first time.

    A tier that never succeeded has no backup to be late from: its first due time is reckoned from this
    record, so status and the overdue alert can tell "just installed" from "never ran". If the record
    cannot be written (a read-only BACKUP_ROOT), the new keys count from `now` this time only.
    """
    keys = list(keys)
    path = backup_root / CONFIGURED_FILE

    def read() -> dict[str, str]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    seen = read()
    if any(key not in seen for key in keys):
        try:
            private_dir(path.parent)  # BACKUP_ROOT too, 0700, if no backup made it yet
            fd = os.open(path.with_name(".configured.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                seen = read()  # another process may have recorded some meanwhile
                missing = {key: now.isoformat() for key in keys if key not in seen}
                if missing:
                    seen.update(missing)
                    write_atomic(path, json.dumps(seen, indent=1, sort_keys=True).encode())
            finally:
                os.close(fd)
        except (OSError, PgbeatError) as exc:
            logging.getLogger(__name__).warning("cannot record the configured tiers in %s: %s", path, exc)
    found = {}
    for key in keys:
        try:
            found[key] = datetime.fromisoformat(seen[key])
        except (KeyError, TypeError, ValueError):
            found[key] = now
    return found


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
    return entry.manifest.taken_at, os.path.basename(entry.path)  # a Path or a key: no Path built per call


def from_the_future(entry: Dated, now: datetime) -> bool:
    """True when `entry` is dated after `now` by more than FUTURE_TOLERANCE (made under a wrong clock)."""
    return entry.manifest.taken_at > now + FUTURE_TOLERANCE


def newest(entries: Iterable[D], now: datetime) -> D | None:
    """Given backups, return the newest by `order_key` that is not from the future at `now`: one dated in
    the future is "latest" only when nothing else is there. None if there are none."""
    ordered = sorted(entries, key=order_key)
    settled = [e for e in ordered if not from_the_future(e, now)]
    return (settled or ordered)[-1] if ordered else None


# A folder's listing is reused while the folder's own stamp is unchanged. Within one tick of a file
# system's timestamps a second change could leave the stamp as it was (git's "racily clean" case), so a
# listing taken less than RACY_S after the folder changed is reused only for RACY_S: a command going over
# a fleet while backups land still lists each folder about once, and nothing is missed for longer.
RACY_S = 2.0


class FolderListing:
    """The backups' manifests in one tier folder, read once per change of the folder (a manifest whose file
    name is not a backup's name, `NAME_RE`, is not a backup). Questions about one target scan the names
    for its prefix (a backup's rotate step asks about one); a question about a second target groups every
    name by the target it names, so a command that looks at every target of a fleet reads the folder once
    instead of once per target, and opens only the manifests of the targets it asks about."""

    def __init__(self, stamp: tuple[int, ...], names: list[str]) -> None:
        self.stamp = stamp
        self.manifests = [n for n in names if n.endswith(MANIFEST_SUFFIX) and not n.startswith(".")]
        self.asked: str | None = None  # the one target asked about so far
        self.by_target: dict[str, list[str]] | None = None

    @staticmethod
    def target_of(name: str) -> str | None:
        parsed = NAME_RE.match(name.removesuffix(MANIFEST_SUFFIX))
        return parsed["target"] if parsed else None

    def names(self, target: str | None) -> list[str]:
        """The manifest names of `target`'s backups (every target's with None), sorted."""
        if target is None:
            return sorted(n for n in self.manifests if self.target_of(n) is not None)
        if self.by_target is None and self.asked in (None, target):
            self.asked = target
            prefix = f"{target}_backup_"  # also another's whose name starts so: told apart by target_of
            return sorted(n for n in self.manifests if n.startswith(prefix) and self.target_of(n) == target)
        if self.by_target is None:
            self.by_target = {}
            for name in self.manifests:
                owner = self.target_of(name)
                if owner is not None:
                    self.by_target.setdefault(owner, []).append(name)
            for group in self.by_target.values():
                group.sort()
        return self.by_target.get(target, [])


_listings: dict[Path, tuple[FolderListing, float | None]] = {}  # with the deadline of a racy one


def folder_listing(folder: Path) -> FolderListing | None:
    """The listing of `folder`, from memory while the folder is unchanged since it was read; None if the
    folder does not exist."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        _listings.pop(folder, None)
        return None
    stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    known, until = _listings.get(folder, (None, None))
    if known is not None and known.stamp == stamp and (until is None or time.monotonic() < until):
        return known
    listing = FolderListing(stamp, os.listdir(folder))
    racy = time.time() - max(st.st_mtime, st.st_ctime) <= RACY_S
    _listings[folder] = (listing, time.monotonic() + RACY_S if racy else None)
    return listing


_shelf_tiers: dict[Path, tuple[tuple[int, ...], tuple[str, ...]]] = {}


def shelf_tiers(backup_root: Path) -> tuple[str, ...]:
    """The tier folders of a shelf: the built-in tiers, then every other folder with a tier's name (a tier
    added to the config, or one since removed from it, whose backups are still there), sorted."""
    try:
        st = os.stat(backup_root)
    except FileNotFoundError:
        return TIERS
    stamp = (st.st_dev, st.st_ino, st.st_mtime_ns)
    known = _shelf_tiers.get(backup_root)
    if known is not None and known[0] == stamp:
        return known[1]
    with os.scandir(backup_root) as entries:
        extra = sorted(e.name for e in entries if e.name not in TIERS and e.name not in RESERVED_TIER_NAMES
                       and TIER_NAME_RE.match(e.name) and e.is_dir())
    _shelf_tiers[backup_root] = (stamp, (*TIERS, *extra))
    return _shelf_tiers[backup_root][1]


def shelf_census(backup_root: Path) -> dict[str, int]:
    """Given a shelf, return how many backups each target has in the tier folders, from the file names
    alone (no manifest opened): what `pgbeat status` needs to find targets no longer configured."""
    counts: dict[str, int] = {}
    for tier in shelf_tiers(backup_root):
        listing = folder_listing(backup_root / tier)
        for name in listing.names(None) if listing is not None else []:
            owner = FolderListing.target_of(name)
            counts[owner] = counts.get(owner, 0) + 1
    return counts


def orphan_census(backup_root: Path, configured: Iterable[str] | Callable[[str], bool]) -> dict[str, int]:
    """The targets with backups on the shelf that are not `configured` (removed or renamed), with how many
    backups each has, by name. `configured` is the configured names, or says whether a name is configured
    (`Settings.owns`: a database of a whole-server target is, also once it is gone from its server)."""
    owns = configured if callable(configured) else set(configured).__contains__
    return {name: count for name, count in sorted(shelf_census(backup_root).items()) if not owns(name)}


def iter_manifests(backup_root: Path, tiers: tuple[str, ...] | None = None,
                   target: str | None = None) -> Iterator[Entry]:
    """Yield an Entry per pgbeat manifest under the tier folders (all of the shelf's unless `tiers`), whether
    or not its data file exists; with `target`, only that target's, and only its manifests are opened."""
    for tier in shelf_tiers(backup_root) if tiers is None else tiers:
        folder = backup_root / tier
        listing = folder_listing(folder)
        if listing is None:
            continue
        where = f"{folder}{os.sep}"
        for name in listing.names(target):
            manifest = read_manifest(where + name)
            data_name = name.removesuffix(MANIFEST_SUFFIX)
            if manifest is None or manifest.file != data_name or manifest.tier != tier:
                continue
            if target is None or manifest.target == target:
                yield Entry(path=folder / data_name, manifest=manifest)


def iter_pre_restore(backup_root: Path) -> Iterator[Entry]:
    """Yield the safety backups a restore took (`BACKUP_ROOT/pre_restore_*`); tier rotation never touches
    them, they are kept by count (pgbeat/steps/rotate.py `rotate_safety_backups`)."""
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
                 include_pre_restore: bool = False, kind: str | None = None) -> list[Entry]:
    """Return the backups on the shelf (data file present), oldest first (`order_key`); with `kind`
    ("logical" or "physical"), only the backups of that kind."""
    tiers = (tier,) if tier else shelf_tiers(backup_root)
    if kind is not None:
        tiers = tuple(t for t in tiers if (t in PHYSICAL_TIERS) == (kind == "physical"))
    found = list(iter_manifests(backup_root, tiers, target))
    if include_pre_restore and tier is None and kind != "physical":
        found += iter_pre_restore(backup_root)
    entries = [e for e in found if e.exists and (target is None or e.manifest.target == target)]
    return sorted(entries, key=order_key)


def find_backup(path: Path) -> Entry | None:
    """Given a backup file's path, return its Entry if a pgbeat manifest stands next to it."""
    manifest = read_manifest(manifest_path(path))
    if manifest is None or manifest.file != path.name:
        return None
    return Entry(path=path, manifest=manifest)
