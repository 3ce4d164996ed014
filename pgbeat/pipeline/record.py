"""The run record: the small JSON document that travels from step to step (never file contents).

Each step reads what the previous steps recorded, does its work on local files, and returns the record
with its own section filled in under `steps[<name>]`. The same record drives the in-process chain and
the Celery chain; `StepContext` carries what must not travel (settings with secrets, the cancel event).

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

from pydantic import BaseModel, Field

from pgbeat import faults
from pgbeat.catalog.manifest import STAMP_FORMAT, backup_name, extension
from pgbeat.postgres.process import CancelEvent
from pgbeat.settings import Settings, Target

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
    steps: dict[str, dict[str, Any]] = Field(default_factory=dict)
    final_path: str | None = None
    status: str = "running"
    failure: Failure | None = None

    def work(self, *parts: str) -> Path:
        return Path(self.work_dir, *parts)

    def step(self, name: str) -> dict[str, Any]:
        return self.steps.get(name, {})

    @property
    def artifact(self) -> Path:
        """The file (or folder) the next step works on: the newest step's `path`."""
        for name in ("verify", "compress", "dump"):
            path = self.steps.get(name, {}).get("path")
            if path:
                return Path(path)
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

    def target(self, run: Run) -> Target:
        return self.target_override or self.settings.target(run.target)


def new_run(settings: Settings, target: Target, tier: str, *, run_id: str | None = None,
            slot: str | None = None, now: datetime | None = None) -> Run:
    """Return the record of a new run of `target`'s `tier` backup, named after its start time."""
    started = now or clock()
    stamp = started.astimezone(settings.tz).strftime(STAMP_FORMAT)
    run_id = run_id or uuid.uuid4().hex
    return Run(
        run_id=run_id, target=target.name, tier=tier, node=settings.node, started_at=started, stamp=stamp,
        name=backup_name(target.name, tier, stamp, extension(target.format, target.compression.codec)),
        format=target.format, codec=target.compression.codec, level=target.compression.level, slot=slot,
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
