"""The work behind each `pgbeat` command: plain functions that take parsed arguments, act through the
core (the pipeline, the steps, the catalog, the restore side), return typed records and raise typed
errors (pgbeat.errors). `pgbeat/cli.py` parses, calls one of these and renders what it returns; the exit
code of a failure comes from its error class.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pgbeat import errors
from pgbeat.coordination import MANUAL_PRIORITY

# Annotations only: each action imports what it works with, so that importing this module (the CLI does,
# for every command, --help among them) costs no pydantic.
if TYPE_CHECKING:
    from pgbeat.catalog.manifest import Entry, Manifest
    from pgbeat.coordination.follow import RunEnd
    from pgbeat.discovery import Discovery
    from pgbeat.pipeline.record import Run
    from pgbeat.restore.drill import DrillResult
    from pgbeat.settings import Settings, Target
    from pgbeat.steps.rotate import TierRotation


def selected_targets(settings: Settings, target: str | None) -> list[str]:
    """Given `--target` (or None: every target), return the names of the targets to act on. Raise
    UnknownTargetError for a target that is not configured, ConfigError when none is.
    A whole-server target stands for the databases it has backups of on the shelf (what rotation, uploads
    and drills act on; `backup_selection` asks the server which it backs up)."""
    from pgbeat.discovery import shelf_members

    if target in settings.servers:
        return list(shelf_members(settings, target))
    if target:
        settings.target(target)  # raises UnknownTargetError with the list of known targets
        return [target]
    if not settings.targets and not settings.servers:
        raise errors.NoTargetsError
    return [*sorted(settings.targets), *(name for server in sorted(settings.servers)
                                         for name in shelf_members(settings, server))]


def backup_selection(settings: Settings, target: str | None, *,
                     dry_run: bool = False) -> tuple[list[str], list[Discovery]]:
    """Given `--target` (or None: every target), return the names of the targets to back up now, each
    whole-server target replaced by the databases it discovers on its server, and those discoveries
    (recorded for `pgbeat status`, unless `dry_run`)."""
    from pgbeat.discovery import expand

    if target in settings.servers:
        return expand(settings, [target], keep=not dry_run)
    if target:
        return selected_targets(settings, target), []
    if not settings.targets and not settings.servers:
        raise errors.NoTargetsError
    return expand(settings, [*sorted(settings.targets), *sorted(settings.servers)], keep=not dry_run)


def run_exit_code(failure: dict | None) -> int:
    """Given a failed run's recorded failure, return the exit code of the error that failed it (a held
    lock: EXIT_LOCKED, ...); EXIT_FAILED when nothing more is known."""
    return errors.error_from_record(failure or {}).exit_code


# --- backup ------------------------------------------------------------------------------------------


@dataclass
class TargetBackup:
    """One target's backup of a tier in this process: `run` is None when the target does not run the tier
    (not one of its tiers, or disabled)."""

    target: str
    run: Run | None = None

    @property
    def exit_code(self) -> int:
        if self.run is None or self.run.status == "succeeded":
            return errors.EXIT_OK
        return run_exit_code(self.run.failure.model_dump() if self.run.failure else None)


def backup_here(settings: Settings, names: list[str], tier: str, *,
                on_start: Callable[[Target, bool], None] = lambda target, enabled: None,
                on_event: Callable[[Run, str, str], None] | None = None,
                on_wait: Callable[[str], None] | None = None,
                on_progress: Callable[[str], None] | None = None) -> list[TargetBackup]:
    """Back up `tier` of each named target in this process (the embedded default), one after the other;
    `on_start(target, enabled)` is told before each, `on_event` of each step, `on_wait` of what a run
    waits for (a busy target, a retry), `on_progress` how far a dump is. Return each target's run."""
    from pgbeat.pipeline.record import StepContext
    from pgbeat.pipeline.runner import run_inprocess

    done = []
    for name in names:
        target = settings.target(name)
        enabled = target.runs_tier(tier)
        on_start(target, enabled)
        ctx = StepContext(settings, on_wait=on_wait, on_progress=on_progress)
        done.append(TargetBackup(name, run_inprocess(settings, name, tier, on_event=on_event, ctx=ctx)
                                 if enabled else None))
    return done


@dataclass
class PlannedBackup:
    """What `pgbeat backup --dry-run` says one target's backup would be, changing nothing."""

    target: str
    tier: str
    enabled: bool
    server: str = ""
    file: str = ""  # the name it would get now
    format: str = ""
    destinations: list[str] = field(default_factory=list)  # "name (kind)"
    encrypted: bool = False
    schedule: str = ""
    next_run: datetime | None = None
    would_remove: list[str] = field(default_factory=list)  # by the rotation after it, at the server's time
    rotation: str | None = None  # why no rotation could be previewed


def plan_backups(settings: Settings, names: list[str], tier: str) -> Iterator[PlannedBackup]:
    """Say what backing up `tier` of each named target now would do: its file, destinations, and what the
    rotation after it would remove (this backup not counted: a preview removes at most that). Reads the
    database servers' clocks; changes nothing."""
    from pgbeat.pipeline.record import new_run
    from pgbeat.schedule import next_runs
    from pgbeat.steps.rotate import rotate_tier, rotation_now

    for name in names:
        target = settings.target(name)
        if not target.runs_tier(tier):
            yield PlannedBackup(name, tier, enabled=False)
            continue
        policy = target.tiers[tier]
        run = new_run(settings, target, tier)
        plan = PlannedBackup(name, tier, enabled=True, server=target.describe(), file=run.name,
                             format=f"{run.format}/{run.codec}", encrypted=target.encryption is not None,
                             destinations=[f"{d.name} ({d.kind})" for d in target.destinations],
                             schedule=policy.schedule, next_run=next_runs(policy.schedule, run.started_at,
                                                                          settings.tz)[0])
        try:
            rotation = rotate_tier(settings, name, tier, rotation_now(settings, name), dry_run=True)
        except errors.PgbeatError as exc:
            plan.rotation = f"the database server's clock could not be read ({exc.message})"
        else:
            plan.would_remove = [e.path.name for e in rotation.local.remove]
            plan.would_remove += [f"{e.path} at {where}" for where, remote in rotation.destinations.items()
                                  for e in remote.remove]
        yield plan


def no_worker(tier: str, what: str) -> errors.NoWorkerError:
    """The error of a backup through the broker that no live worker would take: `what` became of it."""
    from pgbeat.coordination.dispatch import DEFAULT_QUEUE

    return errors.NoWorkerError(
        f"No live worker consumes queue {DEFAULT_QUEUE} (none has a heartbeat in Redis that names it, none "
        f"answered): {what}. Start one (celery -A workers.app worker), or `pgbeat backup {tier} --local` backs up "
        "in this process")


def send_backups(settings: Settings, names: list[str], tier: str, *, need_worker: bool = True) -> dict[str, str]:
    """Send `tasks.backup` of `tier` for each named target to the workers; return {run id: target}.
    Raise UnreachableError if the broker does not answer, and (`need_worker`) NoWorkerError if no live
    worker consumes the queue tasks.backup goes to; then nothing is sent."""
    from pgbeat.coordination.dispatch import DEFAULT_QUEUE, queue_consumers, require_broker, send_task, task_label

    require_broker(settings, f"`pgbeat backup {tier} --local` backs up in this process, without it")
    if need_worker and not queue_consumers(settings, DEFAULT_QUEUE):
        raise no_worker(tier, "nothing was sent")
    runs = {}
    for name in names:
        run_id = uuid.uuid4().hex
        # Manual: ahead of beat's. The CLI follows pgbeat's run state, never Celery's result, so no result
        # subscription is opened (with Redis gone it would retry for 20 s, then raise).
        send_task(settings, "tasks.backup", [name, tier], run_id, shadow=task_label("backup", name, tier),
                  priority=MANUAL_PRIORITY, ignore_result=True)
        runs[run_id] = name
    return runs


# How often a followed backup that no worker has taken yet checks that one still could.
NO_WORKER_CHECK_EVERY = 2.0


def follow_backups(settings: Settings, run_ids: list[str], tier: str, timeout: float, *,
                   show: Callable[[str, str], None] = lambda run_id, line: None,
                   on_end: Callable[[RunEnd], None] = lambda end: None) -> dict[str, RunEnd]:
    """Follow the backup runs `run_ids` on the workers until each ends or `timeout` seconds pass (those
    go on); return how each ended. Raise NoWorkerError when a run that no worker has taken yet waits in
    a queue that no live worker consumes any more (it stays queued)."""
    from pgbeat.coordination import redis_client
    from pgbeat.coordination.dispatch import DEFAULT_QUEUE, queue_consumers
    from pgbeat.coordination.follow import follow_runs
    from pgbeat.coordination.runs import RunState

    last_check = time.monotonic()  # send_backups has just checked

    def watch(run_id: str, fields: dict[str, str]) -> None:
        nonlocal last_check
        if fields.get("status") is not None or time.monotonic() - last_check < NO_WORKER_CHECK_EVERY:
            return  # a worker took it (the reconciler looks after its host), or checked a moment ago
        last_check = time.monotonic()
        if not queue_consumers(settings, DEFAULT_QUEUE):
            raise no_worker(tier, f"run {run_id} stays queued there, and starts when a worker does")

    return follow_runs(RunState(redis_client(settings)), run_ids, timeout, show=show, on_end=on_end, watch=watch)


def backups_exit_code(ends: list[RunEnd]) -> int:
    """Given how the followed backup runs ended, return the command's exit code: 0 when every one
    succeeded, else the code of the first failure's error (EXIT_FAILED for a skip or a timeout)."""
    for end in ends:
        if end.status == "failed":
            return run_exit_code(end.failure)
        if end.status != "succeeded":
            return errors.EXIT_FAILED
    return errors.EXIT_OK


# --- rotate ------------------------------------------------------------------------------------------


@dataclass
class TargetRotation:
    """One target's rotation: each tier's (the rotate step's own function), or why none was done."""

    target: str
    tiers: list[TierRotation] = field(default_factory=list)
    skipped: str | None = None


def rotate(settings: Settings, names: list[str], tier: str | None, *, now: datetime | None = None,
           dry_run: bool = False, orphans: bool = False) -> Iterator[TargetRotation]:
    """Rotate `tier` (or every enabled tier, and the safety backups) of each named target at the database
    server's time (or at `now`), exactly as the rotate step does: the local shelf, then each destination. A target whose
    server's clock cannot be read is skipped, nothing removed: a host's clock alone never decides. With
    `orphans`, then the local backups of targets no longer configured, by `defaults`, at a configured
    server's time (skipped when none could be read).
    Yield one target's rotation at a time, so a fleet's plans are not all held at once."""
    from pgbeat.catalog.manifest import orphan_census, shelf_tiers
    from pgbeat.postgres.clock import ServerReading, boot_id, server_now
    from pgbeat.steps.rotate import TierRotation, rotate_safety_backups, rotate_tier, rotation_now

    def with_safety_backups(name: str, when: datetime, done: list[TierRotation]) -> TargetRotation:
        if tier is None:  # and its safety backups, kept by count
            plan = rotate_safety_backups(settings, name, when, dry_run=dry_run)
            done.append(TierRotation(target=name, tier=plan.tier, now=when, local=plan))
        return TargetRotation(name, done)

    # One reading per database server, carried forward by this host's monotonic clock: a fleet of
    # databases on a few servers is rotated at their servers' time without one connection per target.
    readings: dict[tuple[str, int], ServerReading] = {}
    for name in names:
        server = (settings.target(name).host, settings.target(name).port)
        try:
            when = now or rotation_now(settings, name, readings.get(server))
            if now is None and server not in readings:
                readings[server] = ServerReading(server_time=when.isoformat(), local_time=datetime.now(UTC).isoformat(),
                                                 monotonic=time.monotonic(), boot_id=boot_id())
        except errors.PgbeatError as exc:
            yield TargetRotation(name, skipped=f"the database server's clock could not be read ({exc.message})")
            continue
        target = settings.target(name)
        tiers = ([tier] if tier in target.tiers else []) if tier else target.enabled_tiers()
        yield with_safety_backups(name, when, [rotate_tier(settings, name, t, when, dry_run=dry_run) for t in tiers])
    if not orphans:
        return
    for name in orphan_census(settings.backup_root, settings.owns):
        when = now or next((server_now(r) for r in readings.values() if server_now(r) is not None), None)
        if when is None:
            yield TargetRotation(name, skipped="not in the configuration, rotated by `defaults` at a configured "
                                               "database server's time, and no server's clock could be read")
            continue
        policies = {t: settings.retention_of(name, t) for t in ([tier] if tier else shelf_tiers(settings.backup_root))}
        tiers = [t for t, policy in policies.items() if policy is not None and policy.enabled]
        yield with_safety_backups(name, when, [rotate_tier(settings, name, t, when, dry_run=dry_run) for t in tiers])


def pin(settings: Settings, path: Path, note: str | None, pinned: bool = True) -> Manifest:
    """Pin the backup at `path` (every rotation keeps it, locally and at every destination) with `note`,
    or unpin it; return its manifest. Raise NoSuchBackupError if there is no such file, VerifyError if it
    is not a pgbeat backup or its manifest is damaged."""
    from pgbeat.catalog.manifest import PinRecord, manifest_path, update_manifest
    from pgbeat.steps.verify import open_backup

    entry = open_backup(path)
    record = PinRecord(at=datetime.now(settings.tz).isoformat(timespec="seconds"), note=note or "")

    def change(manifest: Manifest) -> None:
        manifest.pinned = record if pinned else None

    return update_manifest(manifest_path(entry.path), change)


# --- copies, drills ----------------------------------------------------------------------------------


def retry_uploads(settings: Settings, names: list[str], destination: str | None) -> list[str]:
    """Complete the off-site copies of each named target's local backups that are missing or failed (at
    `destination` only, if given); return one line per copy still failing. Raise UnknownTargetError for
    a destination a target does not have."""
    from pgbeat.storage.destinations import replicate_missing

    failures = []
    for name in names:
        target = settings.target(name)
        if destination:
            target.destination(destination)
        failures += replicate_missing(settings, target, destination)
    return failures


def drills(settings: Settings, names: list[str]) -> Iterator[DrillResult]:
    """Drill the latest backup of each named target, yielding each result as it is known. Raise
    DrillInterrupted (recorded, its scratch database dropped) if a signal stops one."""
    from pgbeat.restore.drill import run_drill

    for name in names:
        yield run_drill(settings, name)


# --- fetch, restore ----------------------------------------------------------------------------------


def fetch_and_check(settings: Settings, url: str, folder: Path) -> Entry:
    """Download a copy with its sidecars into `folder` and verify it as stored; return its Entry. Raise
    VerifyError if it does not match its manifest, StorageError if it cannot be read."""
    from pgbeat.steps.verify import verify_backup
    from pgbeat.storage.destinations import fetch

    entry = fetch(settings, url, folder)
    verify_backup(entry.path, settings)
    return entry


def fetch_into(settings: Settings, url: str, folder: Path, identities: list | None = None) -> Entry:
    """Download the copy at `url` with its sidecars and globals file, verify it (and with `identities` its
    plaintext), and only then give it its names in `folder`; return the Entry there.

    `folder` and its missing parents are created 0700. The copy is downloaded into a private staging
    folder inside `folder` (the same file system, so the names appear by a rename), which goes however
    this ends: a damaged, foreign or unreadable copy leaves nothing in `folder`, nor the folders this made.
    Raise UsageError, before anything is downloaded, if `folder` already holds one of the copy's names.
    """
    from pgbeat.catalog.manifest import CHECKSUM_SUFFIX, MANIFEST_SUFFIX, Entry
    from pgbeat.fsutil import DIR_MODE, publish, remove_path
    from pgbeat.steps.verify import verify_backup
    from pgbeat.storage.base import staging_name

    name = url.rstrip("/").rsplit("/", 1)[-1]
    names = [name + CHECKSUM_SUFFIX, name + MANIFEST_SUFFIX, name]  # the order they appear in: data last
    taken = [n for n in names if (folder / n).exists() or (folder / n).is_symlink()]
    if taken:
        raise errors.UsageError(f"{folder} already holds {taken[-1]}: not overwritten",
                                hint="fetch into another folder (--to), or move that file away first")
    created = [f for f in (folder, *folder.parents) if not f.exists()]
    staging = folder / staging_name(name)
    try:
        for made in reversed(created):  # new folders are private; an existing one keeps its mode
            made.mkdir(mode=DIR_MODE)
            os.chmod(made, DIR_MODE)
        staging.mkdir(mode=DIR_MODE)
        entry = fetch_and_check(settings, url, staging)
        if identities and entry.manifest.encryption:
            verify_backup(entry.path, settings, identities)
        if entry.manifest.globals is not None:  # its name is known from the manifest only
            if os.path.lexists(folder / entry.manifest.globals.file):
                raise errors.UsageError(f"{folder} already holds {entry.manifest.globals.file}: not overwritten",
                                        hint="fetch into another folder (--to), or move that file away first")
            names.insert(0, entry.manifest.globals.file)
        for n in names:
            publish(staging / n, folder / n)
    except BaseException:
        remove_path(staging)
        for made in created:  # innermost first; a folder something else wrote into meanwhile stays
            with contextlib.suppress(OSError):
                made.rmdir()
        raise
    remove_path(staging)
    return Entry(path=folder / name, manifest=entry.manifest)


def verify_location(settings: Settings, location: str, identities: list | None = None):
    """Verify the backup at `location`: a file on this machine, or a copy at a destination (downloaded with
    its sidecars into a scratch folder, checked as stored, removed afterwards). Return (its manifest, the
    verify result); raise VerifyError (exit 3) if it does not match, NoSuchBackupError if it is not there."""
    from pgbeat.pipeline.record import scratch_folder
    from pgbeat.steps.verify import verify_backup

    if "://" not in location:
        return verify_backup(Path(location), settings, identities)
    with scratch_folder(settings, "fetch") as folder:
        entry = fetch_and_check(settings, location, folder)
        return verify_backup(entry.path, settings, identities)
