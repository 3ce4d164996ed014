"""What `pgbeat status` and `/metrics` report, computed from the manifests and the attempts record.

Everything comes from files under BACKUP_ROOT, so the figures are right whichever worker ran a backup
and survive restarts of any process: the seed's `ls -lt`, `du -sh` and `df -h` in one place. Backups
are ordered and dated by the database server's clock (`Manifest.taken_at`, `completed_at`), so a worker
whose clock was wrong cannot make its backup the "last success"; one dated after `now` is flagged.

The one exception is WAL archiving, which only the server can tell about (is archive_command failing,
which WAL file is it writing): for each target with the base tier, one query to its server
(pgbeat/wal/archiver.py), beside the walk of this host's archive. The other targets' servers are never
connected to.

A tier that never succeeded (and a target with drills that was never drilled) is "never", not overdue:
its first due time is the first scheduled time after it was first seen in the configuration
(`catalog.manifest.first_configured`), and it is overdue once that is as far past as a tier with
backups would be (OVERDUE_FACTOR periods after its last success is half a period after its next run).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgbeat.catalog.manifest import (
    Entry,
    first_configured,
    from_the_future,
    list_backups,
    newest,
    orphan_census,
    read_attempts,
)
from pgbeat.schedule import min_interval, next_runs
from pgbeat.settings import Settings
from pgbeat.wal.archiver import ArchiverReading, read_archivers

if TYPE_CHECKING:
    from pgbeat.wal.receiver import ReceiverStatus

OVERDUE_FACTOR = 1.5


@dataclass
class TierStatus:
    target: str
    tier: str
    schedule: str
    interval_s: float
    next_run: str
    last_success_at: str | None = None
    last_success_file: str | None = None
    size: int | None = None
    duration_s: float | None = None
    age_s: float | None = None
    overdue: bool = False
    kept: dict[str, int] = field(default_factory=dict)  # backups kept per destination
    copies: list[str] = field(default_factory=list)  # destinations holding the newest backup
    last_attempt: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)  # of the newest backup, and about clocks
    warning_kinds: list[str] = field(default_factory=list)  # the kind of each warning (WARNING_KINDS)
    future: list[str] = field(default_factory=list)  # backups dated after `now` (made under a wrong clock)
    clock_skew_s: float | None = None  # the newest backup's worker clock minus the server's
    first_due_at: str | None = None  # never succeeded: the first scheduled time since it was configured
    # A database of a whole-server target that is gone from its server: never overdue (no backup is due),
    # its backups kept; /metrics gives it no expected interval, so no overdue alert fires for it.
    gone: bool = False

    @property
    def never(self) -> bool:
        return self.last_success_at is None

    @property
    def size_anomaly(self) -> bool:
        return bool({"size-drop", "tables-gone"} & set(self.warning_kinds))


@dataclass
class DrillStatus:
    target: str
    backup: str
    at: str
    status: str
    duration_s: float
    restore_s: float | None
    warnings: list[str] = field(default_factory=list)  # what a passed drill could not prove


@dataclass
class NeverDrilled:
    """A target whose drills are enabled and that was never drilled."""

    target: str
    first_due_at: str  # the first drill time since the target was configured
    overdue: bool


def overdue_since_first_due(first_due: datetime, interval_s: float, now: datetime) -> bool:
    """True when something never done is as late as OVERDUE_FACTOR periods after a last success would be."""
    return (now - first_due).total_seconds() > (OVERDUE_FACTOR - 1) * interval_s


@dataclass
class ArchivingStatus:
    """A target with the base tier: its server's own account of archiving (pgbeat/wal/archiver.py), beside
    the newest segment this host's archive holds."""

    reachable: bool
    error: str | None = None  # why the server could not be read
    archive_mode: str | None = None  # off, on, always
    standby: bool = False  # in recovery: no WAL file of its own being written to compare with
    current_wal: str | None = None  # the WAL file the server is writing
    newest_archived: str | None = None  # the newest segment in this host's archive
    # The current WAL file minus the archive's newest segment: 0 or 1 when archiving keeps up (the file
    # being written is archived once it is finished); None when either is unknown.
    lag_segments: int | None = None
    lag_seconds: float | None = None  # since the server last archived a file, by its own clock
    last_archived_wal: str | None = None
    last_archived_at: str | None = None
    failed_count: int | None = None  # since the server's statistics were reset (stats_reset)
    last_failed_wal: str | None = None
    last_failed_at: str | None = None
    failing: bool = False  # the last failure is newer than the last success: archiving is failing now
    stats_reset: str | None = None


def archiving_status(reading: ArchiverReading, newest_archived: str | None) -> ArchivingStatus:
    """Given a reading of a server's archiver and the newest segment of its archive here, return what
    status and /metrics show: the lag in segments and seconds, and whether archive_command is failing."""
    from pgbeat.wal.walk import segments_after

    def iso(moment: datetime | None) -> str | None:
        return moment.isoformat() if moment is not None else None

    if not reading.reachable:
        return ArchivingStatus(reachable=False, error=reading.error, newest_archived=newest_archived)
    lag_segments = None
    if reading.current_wal and newest_archived and reading.segment_size:
        # An archive ahead of the server (one restored from a copy, a new timeline) is not behind.
        lag_segments = max(0, segments_after(newest_archived, reading.current_wal, reading.segment_size))
    lag_seconds = None
    if reading.last_archived_time is not None and reading.server_time is not None:
        lag_seconds = max(0.0, round((reading.server_time - reading.last_archived_time).total_seconds(), 3))
    return ArchivingStatus(
        reachable=True, archive_mode=reading.archive_mode, standby=reading.in_recovery,
        current_wal=reading.current_wal, newest_archived=newest_archived, lag_segments=lag_segments,
        lag_seconds=lag_seconds, last_archived_wal=reading.last_archived_wal,
        last_archived_at=iso(reading.last_archived_time), failed_count=reading.failed_count,
        last_failed_wal=reading.last_failed_wal, last_failed_at=iso(reading.last_failed_time),
        failing=reading.failing, stats_reset=iso(reading.stats_reset))


@dataclass
class WalStatus:
    """A target with the base tier: what its WAL archive lets it restore (pgbeat/wal/walk.py), and how its
    server's archiving is doing."""

    target: str
    window_start: str | None  # the oldest base backup's consistent point (the server's clock)
    window_end: str | None  # when the last segment reached without a gap was archived
    end_segment: str | None
    newest_segment: str | None
    segments: int
    gap_count: int
    gaps: list[str] = field(default_factory=list)
    timelines: list[int] = field(default_factory=list)
    base_backups: int = 0  # none yet: nothing is restorable, whatever the archive holds
    archiving: ArchivingStatus | None = None
    receiver: ReceiverStatus | None = None  # a target with wal.receiver, when a broker is configured


def wal_status(settings: Settings, target: str, reading: ArchiverReading | None = None) -> WalStatus:
    """Given a target with the base tier and a reading of its server's archiver, return its WAL status."""
    from pgbeat.physical.pitr import base_backups
    from pgbeat.wal.walk import walk_archive

    bases = base_backups(settings, target)
    walk = walk_archive(settings, target, bases)
    stops = [e.manifest.physical.stop_time for e in bases if e.manifest.physical and e.manifest.physical.stop_time]
    return WalStatus(target=target, window_start=min(stops).isoformat() if stops else None,
                     window_end=walk.end_at.isoformat() if walk.end_at else None, end_segment=walk.end,
                     newest_segment=walk.newest, segments=walk.segments, gap_count=walk.gap_count, gaps=walk.gaps,
                     timelines=walk.timelines, base_backups=len(bases),
                     archiving=archiving_status(reading, walk.newest) if reading is not None else None,
                     receiver=receiver_of(settings, target))


def receiver_of(settings: Settings, target: str) -> ReceiverStatus | None:
    """The receiver's lease and state in Redis, for a target with wal.receiver (none without a broker)."""
    if not settings.target(target).wal.receiver or settings.embedded:
        return None
    from pgbeat.coordination import redis_client
    from pgbeat.wal.receiver import receiver_status

    return receiver_status(redis_client(settings), target)


@dataclass
class StatusReport:
    generated_at: str
    backup_root: str
    disk_total: int
    disk_free: int
    used: int
    tiers: list[TierStatus]
    drills: list[DrillStatus]
    drill_intervals: dict[str, float] = field(default_factory=dict)  # per target with drills enabled
    never_drilled: list[NeverDrilled] = field(default_factory=list)
    orphans: dict[str, int] = field(default_factory=dict)  # backups per target no longer in the configuration
    wal: list[WalStatus] = field(default_factory=list)  # targets with the base tier
    runs: dict[str, Any] = field(default_factory=dict)
    # Per whole-server target, its last discovery (pgbeat.discovery): when, which databases, which are gone.
    servers: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        # Field by field rather than dataclasses.asdict, whose deep copy of every value is most of the cost
        # of a fleet's status; the records hold only JSON values.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["tiers"] = [{**vars(t), "size_anomaly": t.size_anomaly, "never": t.never} for t in self.tiers]
        data["drills"] = [dict(vars(d)) for d in self.drills]
        data["never_drilled"] = [dict(vars(n)) for n in self.never_drilled]
        data["wal"] = [{**vars(w), "archiving": dict(vars(w.archiving)) if w.archiving else None,
                        "receiver": dict(vars(w.receiver)) if w.receiver else None} for w in self.wal]
        return data


def folder_size(path: Path | str) -> int:
    """The bytes of every file under `path` (what `du` would count, by apparent size)."""
    total = 0
    try:
        entries = list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir(follow_symlinks=False):
                total += folder_size(entry.path)
            else:
                total += entry.stat(follow_symlinks=False).st_size
    return total


def tier_status(settings: Settings, target: str, tier: str, entries: list[Entry], now: datetime,
                attempts: dict[str, dict[str, Any]], configured_at: datetime | None = None) -> TierStatus:
    policy = settings.target(target).tiers[tier]
    status = TierStatus(target=target, tier=tier, schedule=policy.schedule,
                        interval_s=min_interval(policy.schedule, now, settings.tz).total_seconds(),
                        next_run=next_runs(policy.schedule, now, settings.tz)[0].isoformat(),
                        last_attempt=attempts.get(f"{target}/{tier}"))
    verified = [e for e in entries if e.verified]
    for entry in verified:
        for destination in entry.manifest.good_copies():
            status.kept[destination] = status.kept.get(destination, 0) + 1
    status.future = [e.path.name for e in entries if from_the_future(e, now)]
    last = newest(verified, now)
    if last is not None:
        m = last.manifest
        finished = m.completed_at
        status.last_success_at = finished.isoformat()
        status.last_success_file = last.path.name
        status.size, status.duration_s = m.size, m.duration_s
        status.warnings, status.warning_kinds = [w.text for w in m.warnings], [w.kind for w in m.warnings]
        status.copies = m.good_copies()
        status.clock_skew_s = m.clock_skew_s
        status.age_s = max(0.0, (now - finished).total_seconds())
        status.overdue = status.age_s > OVERDUE_FACTOR * status.interval_s
    else:
        first_due = next_runs(policy.schedule, configured_at or now, settings.tz)[0]
        status.first_due_at = first_due.isoformat()
        status.overdue = overdue_since_first_due(first_due, status.interval_s, now)
    if status.future:
        status.warnings.append(f"{len(status.future)} backup(s) dated in the future (made under a wrong clock; "
                               f"never the last success, never removed by age): {', '.join(status.future[:5])}")
        status.warning_kinds.append("clock")
    return status


def build_status(settings: Settings, now: datetime) -> StatusReport:
    from pgbeat.discovery import last_discovery, shelf_members

    attempts = read_attempts(settings.backup_root)
    names = sorted(settings.targets)
    servers: dict[str, Any] = {}
    gone: set[str] = set()
    for server in sorted(settings.servers):
        # A whole-server target's databases: those its last run backed up, and those with backups on the shelf.
        last = last_discovery(settings, server)
        members = {**(last.databases if last else {}), **shelf_members(settings, server)}
        names += sorted(members)
        gone |= set(last.gone) if last else set()
        servers[server] = ({"discovered_at": last.at, "databases": last.databases, "excluded": last.excluded,
                            "refused": last.refused, "gone": last.gone, "warnings": last.warnings()}
                           if last else {"discovered_at": None, "databases": {}, "excluded": [], "refused": {},
                                         "gone": {}, "warnings": []})
    configured = first_configured(
        settings.backup_root,
        [f"{name}/{tier}" for name in names for tier in settings.target(name).enabled_tiers()]
        + [f"drill/{name}" for name in names if settings.target(name).drill.enabled], now)
    tiers, drills, drill_intervals, never_drilled = [], [], {}, []
    for name in names:
        target = settings.target(name)
        entries = list_backups(settings.backup_root, name)
        for tier in target.enabled_tiers():
            tiers.append(tier_status(settings, name, tier, [e for e in entries if e.manifest.tier == tier], now,
                                     attempts, configured[f"{name}/{tier}"]))
            if name in gone:
                tiers[-1].gone, tiers[-1].overdue = True, False
                tiers[-1].warnings.append("the database is gone from its server: no new backups; these are kept")
                tiers[-1].warning_kinds.append("gone")
        drilled = [(d, e) for e in entries for d in e.manifest.drills]
        if drilled:
            last, entry = max(drilled, key=lambda pair: pair[0].at)
            drills.append(DrillStatus(target=name, backup=entry.path.name, at=last.at, status=last.status,
                                      duration_s=last.duration_s, restore_s=last.restore_s,
                                      warnings=list(last.warnings)))
        if target.drill.enabled and name not in gone:
            interval = min_interval(target.drill.schedule, now, settings.tz).total_seconds()
            drill_intervals[name] = interval
            if not drilled:
                first_due = next_runs(target.drill.schedule, configured[f"drill/{name}"], settings.tz)[0]
                never_drilled.append(NeverDrilled(target=name, first_due_at=first_due.isoformat(),
                                                  overdue=overdue_since_first_due(first_due, interval, now)))
    # Only the targets with the base tier archive WAL: the others' servers are never connected to.
    archived = [name for name in names if settings.target(name).tiers["base"].enabled]
    readings = read_archivers([settings.target(name) for name in archived]) if archived else {}
    root = settings.backup_root
    usage = shutil.disk_usage(root) if root.exists() else shutil.disk_usage(root.parent)
    return StatusReport(generated_at=now.isoformat(), backup_root=str(root), disk_total=usage.total,
                        disk_free=usage.free, used=folder_size(root) if root.exists() else 0, tiers=tiers,
                        drills=drills, drill_intervals=drill_intervals, never_drilled=never_drilled,
                        orphans=orphan_census(root, settings.owns),
                        wal=[wal_status(settings, name, readings[name]) for name in archived], servers=servers)
