"""The run record: the small JSON document that travels from step to step (never file contents).

Each step reads what the previous steps recorded, does its work on local files, and returns the record
with its own typed result under `steps.<name>` (`StepResults`). The same record drives the in-process
chain and the Celery chain; `StepContext` carries what must not travel (settings with secrets, the
cancel event).

A run's files live in its work folder `BACKUP_ROOT/.work/<run_id>` until the upload gives the backup its
final name. Whoever runs a step holds the folder (pgbeat.fsutil.hold_dir: an flock the kernel drops when
the process dies); `sweep_work_folders`, run by every pgbeat process when it starts (pgbeat.startup),
removes the folders that no live process holds and no active Celery run still needs. Every other
transient folder (a fetch before a restore, a decrypted copy under verify, an off-site sidecar) is a
`scratch_folder`: held the same way, so one sweep covers them all.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from pgbeat import faults
from pgbeat.catalog.manifest import (
    STAMP_FORMAT,
    ChainInfo,
    GlobalsInfo,
    PhysicalInfo,
    backup_name,
    extension,
    parse_name,
)
from pgbeat.postgres.clock import ServerReading
from pgbeat.postgres.process import CancelEvent
from pgbeat.settings import PHYSICAL_TIERS, Settings, Target

log = logging.getLogger(__name__)

WORK_DIR = ".work"
# Run ids: uuid4().hex from pgbeat, or a Celery task id (a uuid with dashes) from `celery call`.
RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$|^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class Failure(BaseModel):
    """Why a run failed, as the runner contract records it (pgbeat.pipeline.runner.fail_run): the step,
    the message and detail lines (never a secret), the hint for the reader, the error's class name."""

    step: str
    message: str
    details: list[str] = Field(default_factory=list)
    hint: str | None = None
    error: str


# --- what each step records ------------------------------------------------------------------------------


class StepResult(BaseModel):
    """What every step records of itself in the run record. A step's own result extends it."""

    model_config = ConfigDict(extra="forbid")

    duration_s: float = 0.0


class ArtifactResult(StepResult):
    """A step that leaves a file (or folder) for the next step: where it is, how big, its SHA-256 if known."""

    path: str
    size: int
    sha256: str | None = None


class DumpResult(ArtifactResult):
    started_at: datetime
    pg_dump_version: str | None = Field(None, description="the version of the client program that ran")
    client_dir: str | None = Field(None, description="its bin folder (pgbeat.postgres.clients)")
    client_note: str | None = Field(None, description="why a client of another major than the server's ran")
    source: str | None = Field(None, description="the server read (a standby's, when prefer_standby chose it)")
    source_note: str | None = Field(None, description="why the preferred standby was not read")
    warnings: list[str] = Field(default_factory=list, description="pg_dump's last lines on stderr")
    # The server's clock as pg_dump started (pgbeat.postgres.clock), or why it could not be read.
    clock: ServerReading | None = None
    server_time: str | None = None
    clock_skew_s: float | None = None
    clock_error: str | None = None
    # What the stream scanner saw of a plain dump (pgbeat.postgres.sqlscan): the bytes pg_dump wrote.
    raw_size: int | None = None
    raw_crc32: str | None = None
    tables: dict[str, int] = Field(default_factory=dict, description="rows per table, from the COPY blocks")
    complete: bool = False
    server_version: str | None = None
    # A plain dump compressed while streaming: each block was read back against pg_dump's bytes.
    compressed: bool = False
    codec: str | None = None
    blocks: int | None = None
    blocks_checked: bool = False
    physical: PhysicalInfo | None = Field(None, description="a base backup: its WAL range (pg_basebackup)")
    chain: ChainInfo | None = Field(None, description="a base backup of a tier with incrementals: full, or "
                                                      "incremental to which parent")
    incremental_note: str | None = Field(None, description="why a tier asking for incrementals took a full one")
    # The server's globals (pgbeat.postgres.globals), in the work folder beside the dump, or why not.
    globals: GlobalsInfo | None = None
    globals_note: str | None = None
    # The database's own properties (pgbeat.postgres.database), for a restore that creates it.
    properties: dict[str, Any] | None = None


class CompressResult(ArtifactResult):
    codec: str
    level: int | None = None
    ratio: float | None = None
    blocks: int | None = None
    passthrough: bool = Field(False, description="the dump arrived compressed (a streaming dump, an archive)")


class VerifyResult(ArtifactResult):
    md5: str | None = None


class UploadResult(StepResult):
    copies: dict[str, str | None] = Field(default_factory=dict, description="destination: location or error")
    failed: list[str] = Field(default_factory=list)


class RotateResult(StepResult):
    removed: list[str] = Field(default_factory=list, description="names removed from the local shelf")
    removed_by_destination: dict[str, list[str]] = Field(default_factory=dict)
    errors: list[str] = Field(default_factory=list, description="what could not be rotated, and why")
    kept: int | None = None
    protected: list[str] = Field(default_factory=list)
    future: list[str] = Field(default_factory=list)
    server_now: datetime | None = None


class NotifyResult(StepResult):
    event: str
    sent: list[str] = Field(default_factory=list)
    failed: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


class StepResults(BaseModel):
    """The results of a run's steps so far, one typed field per step of the table (None: not run yet).

    A step of a caller's own plan (a restore's safety backup publishes instead of uploading) records in
    the field of the step it stands for.
    """

    model_config = ConfigDict(extra="forbid")

    dump: DumpResult | None = None
    compress: CompressResult | None = None
    verify: VerifyResult | None = None
    upload: UploadResult | None = None
    rotate: RotateResult | None = None
    notify: NotifyResult | None = None

    @model_serializer(mode="wrap")
    def _without_pending(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The record lists the steps that ran, not the ones still to come.
        return {k: v for k, v in handler(self).items() if v is not None}

    def get(self, name: str) -> StepResult | None:
        """Given a step's name, return its result, or None if it has not run."""
        return getattr(self, name, None)

    def items(self) -> list[tuple[str, StepResult]]:
        """The results of the steps that ran, in the table's order."""
        return [(name, result) for name in type(self).model_fields if (result := getattr(self, name)) is not None]


class Run(BaseModel):
    run_id: str
    target: str
    tier: str
    node: str
    started_at: datetime
    stamp: str = Field(description="YYYYMMDD_HHMMSS in the configured time zone; part of the file name")
    name: str = Field(description="the backup's final file name")
    format: str
    codec: str
    level: int
    slot: str | None = Field(None, description="the scheduled slot this run serves (beat runs only)")
    work_dir: str
    steps: StepResults = Field(default_factory=StepResults)
    final_path: str | None = None
    status: str = "running"
    failure: Failure | None = None

    @property
    def kind(self) -> str:
        """"physical" for a base backup of the whole cluster (the `base` tier), else "logical" (pg_dump)."""
        return "physical" if self.tier in PHYSICAL_TIERS else "logical"

    @property
    def keeps_globals(self) -> bool:
        """Whether the backup carries its server's globals (pgbeat.postgres.globals): a logical backup of a
        tier does; a base backup holds them already, and a restore's safety backup (not named like a tier's
        backup) goes back onto the server they came from."""
        return self.kind == "logical" and parse_name(self.name) is not None

    def work(self, *parts: str) -> Path:
        return Path(self.work_dir, *parts)

    @property
    def artifact(self) -> Path:
        """The file (or folder) the next step works on: the newest step's `path`."""
        for result in (self.steps.verify, self.steps.compress, self.steps.dump):
            if result is not None:
                return Path(result.path)
        raise ValueError("no artifact yet: the dump step has not run")

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def clock() -> datetime:
    return datetime.now(UTC)


@dataclass
class StepContext:
    """What a step needs besides the record: resolved settings and ways to be stopped."""

    settings: Settings
    cancel: CancelEvent = field(default_factory=CancelEvent)
    now: Callable[[], datetime] = clock
    # The connection to dump when it is not the run's configured target (a restore's safety backup).
    target_override: Target | None = None
    # once(what) is True the first time it is asked for `what` in this run, False ever after: set where a
    # step may be delivered again (Celery), so that a side effect outside BACKUP_ROOT (a notification)
    # is not repeated. None in-process, where a step runs once.
    once: Callable[[str], bool] | None = None
    # Told what the run waits for (a busy target, a retry after a failure), when someone is watching: the
    # in-process runner on a terminal. None: only logged.
    on_wait: Callable[[str], None] | None = None
    # Told how far a long step is, every second (on a terminal only: nothing noisy in a log).
    on_progress: Callable[[str], None] | None = None

    def target(self, run: Run) -> Target:
        return self.target_override or self.settings.target(run.target)


def new_run(settings: Settings, target: Target, tier: str, *, run_id: str | None = None,
            slot: str | None = None, now: datetime | None = None) -> Run:
    """Return the record of a new run of `target`'s `tier` backup, named after its start time."""
    started = now or clock()
    stamp = started.astimezone(settings.tz).strftime(STAMP_FORMAT)
    run_id = run_id or uuid.uuid4().hex
    backup_format = "tar" if tier in PHYSICAL_TIERS else target.format
    return Run(
        run_id=run_id, target=target.name, tier=tier, node=settings.node, started_at=started, stamp=stamp,
        name=backup_name(target.name, tier, stamp, extension(backup_format, target.compression.codec)),
        format=backup_format, codec=target.compression.codec, level=target.compression.level, slot=slot,
        work_dir=str(settings.backup_root / WORK_DIR / run_id),
    )


# --- leftovers of killed runs ---------------------------------------------------------------------------


def _run_still_active(settings: Settings, run_ids: list[str]) -> set[str]:
    """Return which of `run_ids` the broker's run state says are still on their way (every one of them if
    Redis cannot be asked: a folder is kept rather than risk a live run's files)."""
    if settings.broker_url is None or not run_ids:
        return set()
    import redis  # only a host with unlocked run folders and a broker pays for the import

    from pgbeat.coordination.runs import RunState

    client = redis.Redis.from_url(settings.broker_url.get_secret_value(), socket_timeout=5,
                                  socket_connect_timeout=3)
    try:
        state = RunState(client)
        return {run_id for run_id in run_ids if state.get(run_id).get("status") in RunState.ACTIVE}
    except redis.RedisError as exc:
        log.warning("cannot ask Redis which runs are active (%s): keeping their work folders", exc)
        return set(run_ids)
    finally:
        client.close()


# What each kind of scratch folder holds; a fault point per kind, so the leftover tests cover a new one.
SCRATCH_PURPOSES = {
    "fetch": "a copy downloaded from a destination, before restore checks and loads it",
    "verify": "the plaintext of an encrypted backup, decrypted to be checked",
    "unpack": "a base backup unpacked for pg_verifybackup to check",
    "offsite": "a copy being encrypted or a sidecar being written for a destination",
}
SCRATCH_FULL = {purpose: faults.declare(f"scratch.{purpose}", f"a scratch folder holds {what}; it is not removed yet")
                for purpose, what in SCRATCH_PURPOSES.items()}


@contextmanager
def scratch_folder(settings: Settings, purpose: str) -> Iterator[Path]:
    """Given what it is for (a key of SCRATCH_PURPOSES), yield a new private folder under BACKUP_ROOT/.work.

    The folder is held (an flock) while in use and removed afterwards; a process killed inside leaves
    it unheld, and the next pgbeat run of any kind removes it (`sweep_work_folders`), plaintext included.
    """
    from pgbeat.fsutil import hold_dir, remove_path

    folder = settings.backup_root / WORK_DIR / f"{purpose}-{uuid.uuid4().hex[:12]}"
    with hold_dir(folder, create=True):
        try:
            yield folder
        finally:
            faults.fault_point(SCRATCH_FULL[purpose])
            remove_path(folder)


def sweep_work_folders(settings: Settings) -> list[str]:
    """Remove from `BACKUP_ROOT/.work` what killed runs left there; return one line per folder removed.

    A folder goes when no live process holds its lock and, for a run of the Celery chain (named by its
    run id), the run is no longer active in Redis (a run between two steps holds no lock; it is finished,
    failed, abandoned to another host, or forgotten with Redis's data). Before a dead run's folder goes,
    what its upload had put on the shelf without the data file (sidecars under a final name) is taken
    back. Scratch folders go the same way; the folders of restores and drills are their journal's to undo.
    """
    from pgbeat.fsutil import LOCK_FILE, acquire_dir, release_dir, remove_path

    work = settings.backup_root / WORK_DIR
    try:
        names = sorted(os.listdir(work))
    except (FileNotFoundError, NotADirectoryError):
        return []
    candidates = []
    for name in names:
        path = work / name
        if not path.is_dir() or path.is_symlink():
            continue
        if RUN_ID_RE.match(name) or (path / LOCK_FILE).exists() or (name.startswith(".") and ".new-" in name):
            candidates.append(path)
    if not candidates:
        return []
    active = _run_still_active(settings, [p.name for p in candidates if RUN_ID_RE.match(p.name)])
    done = []
    for path in candidates:
        if path.name in active:
            continue
        held = acquire_dir(path, wait=0)
        if not held:
            continue  # in use by a live process (None), or gone meanwhile (False)
        try:
            if RUN_ID_RE.match(path.name):
                from pgbeat.steps.upload import undo_partial_publish  # rare: only for a dead run's folder

                done += undo_partial_publish(settings, path, path.name)
            remove_path(path)
        finally:
            release_dir(path)
        done.append(f"removed the work folder {path} of a run that is no longer running")
    return done
