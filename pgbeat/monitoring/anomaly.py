"""Warnings that are not failures: the signs of a backup that "worked" but should worry a DBA.

- much smaller than the previous backups of the same target and tier (a dump that silently lost a
  table, what DBAs most often find too late), and tables that were in the previous backup but are gone;
- much slower than usual;
- BACKUP_ROOT running out of space;
- a database without tables (a wrong `dbname`, or a schema-only database): a backup of nothing;
- the clock of the worker that made it far from the database server's (or the server's not read);
- the standby the target prefers passed over: the backup read the primary;
- the server's globals dumped without role passwords (the backup user is not a superuser), or not at all;
- a base tier asking for incremental backups that had to take a full one (pgbeat.physical.incremental).

Each is a `BackupWarning` with a kind (catalog.manifest.WARNING_KINDS): status and metrics decide by
the kind, the text is for people. "Previous" is by the one order of backups (`catalog.order_key`: the
database server's clock), and of the same kind of base backup (full or incremental).
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from pgbeat.catalog.manifest import BackupWarning, Entry, list_backups, order_key
from pgbeat.postgres.clock import SKEW_WARNING
from pgbeat.postgres.globals import NO_PASSWORDS_WARNING
from pgbeat.runlog import human_size
from pgbeat.settings import MonitoringSpec, Settings


def disk_warnings(backup_root: Path, monitoring: MonitoringSpec) -> list[BackupWarning]:
    usage = shutil.disk_usage(backup_root)
    percent = 100.0 * usage.free / usage.total if usage.total else 100.0
    if percent < monitoring.min_free_percent or usage.free < monitoring.min_free_bytes:
        text = f"only {human_size(usage.free)} ({percent:.1f}%) free on {backup_root}"
        return [BackupWarning(kind="disk", text=text)]
    return []


def comparison_warnings(current: Entry, previous: list[Entry], monitoring: MonitoringSpec) -> list[BackupWarning]:
    """Compare a new backup with the previous ones of the same target and tier (oldest first)."""
    history = [e for e in previous if e.verified][-monitoring.history:]
    if not history:
        return []
    warnings = []
    m = current.manifest

    def measure(entry: Entry) -> int:
        return entry.manifest.raw_size or entry.manifest.size

    sizes = [measure(e) for e in history]
    median_size = statistics.median(sizes)
    if len(history) >= 2 and median_size and measure(current) < monitoring.size_drop_ratio * median_size:
        warnings.append(BackupWarning(kind="size-drop", text=(
            f"backup is {human_size(measure(current))}, {100 * measure(current) / median_size:.0f}% of the median "
            f"of the previous {len(history)} ({human_size(int(median_size))}): was data lost?")))
    gone = sorted(set(history[-1].manifest.tables) - set(m.tables))
    if gone:
        warnings.append(BackupWarning(kind="tables-gone", text=(
            f"{len(gone)} table(s) of the previous backup are missing: {', '.join(gone[:5])}")))
    durations = [e.manifest.duration_s for e in history if e.manifest.duration_s]
    if durations and m.duration_s and m.duration_s > monitoring.min_duration_s:
        median_duration = statistics.median(durations)
        if m.duration_s > monitoring.duration_growth_ratio * median_duration:
            warnings.append(BackupWarning(kind="slow", text=(
                f"backup took {m.duration_s:.0f}s, {m.duration_s / median_duration:.1f}x the median "
                f"of the previous {len(durations)} ({median_duration:.0f}s)")))
    return warnings


def empty_warnings(current: Entry) -> list[BackupWarning]:
    """Say when the dump held no table at all: it verifies, restores, and proves nothing about the data."""
    if current.manifest.tables or current.manifest.physical is not None:
        return []  # a base backup copies files: it counts no rows (pg_verifybackup proved every file)
    name = (current.manifest.database or {}).get("dbname") or current.manifest.target
    return [BackupWarning(kind="empty", text=(
        f"the database {name} has no tables: this backup "
        "holds no data (is dbname the right database?)"))]


def clock_warnings(current: Entry) -> list[BackupWarning]:
    """Say when the worker's clock was far from the database server's as this backup was taken."""
    m = current.manifest
    if m.server_time is None:
        return [BackupWarning(kind="clock", text=(
            f"the database server's clock was not read: {current.path.name} is dated by the clock of "
            f"{m.node or 'its worker'}, which orders it among the others"))]
    if m.clock_skew_s is not None and abs(m.clock_skew_s) > SKEW_WARNING.total_seconds():
        side = "ahead of" if m.clock_skew_s > 0 else "behind"
        return [BackupWarning(kind="clock", text=(
            f"the clock of {m.node or 'the worker'} is {human_duration(abs(m.clock_skew_s))} {side} the "
            f"database server's: the file name's stamp uses it, but the backup is dated and ordered by "
            f"the server's clock ({m.server_time.isoformat()}); fix the host's time (NTP)"))]
    return []


def standby_warnings(current: Entry) -> list[BackupWarning]:
    """Say when the standby the target prefers was passed over and the primary was read instead."""
    note = current.manifest.steps.get("dump", {}).get("source_note")
    return [BackupWarning(kind="standby", text=note)] if note else []


def incremental_warnings(current: Entry) -> list[BackupWarning]:
    """Say when the base tier asks for incremental backups and this one had to be full for a reason the
    schedule did not plan (an older server, summarize_wal off, a broken chain: pgbeat.physical.incremental)."""
    note = current.manifest.steps.get("dump", {}).get("incremental_note")
    return [BackupWarning(kind="incremental", text=note)] if note else []


def globals_warnings(current: Entry) -> list[BackupWarning]:
    """Say when a logical backup's globals have no role passwords (a backup user that is not a superuser),
    or could not be dumped at all (pgbeat.postgres.globals)."""
    m = current.manifest
    if m.globals is not None:
        return [] if m.globals.passwords else [BackupWarning(kind="globals", text=NO_PASSWORDS_WARNING)]
    note = m.steps.get("dump", {}).get("globals_note")
    return [BackupWarning(kind="globals", text=note)] if note else []


def chain_kind(entry: Entry) -> str:
    return entry.manifest.chain.kind if entry.manifest.chain is not None else "full"


def human_duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} seconds"


def backup_warnings(settings: Settings, current: Entry) -> list[BackupWarning]:
    entries = list_backups(settings.backup_root, current.manifest.target, current.manifest.tier)
    # An incremental base backup holds only what changed: it is compared with the incrementals, a full one
    # with the full ones, never one kind with the other (an incremental is meant to be much smaller).
    previous = [e for e in entries if order_key(e) < order_key(current) and chain_kind(e) == chain_kind(current)]
    return (empty_warnings(current) + comparison_warnings(current, previous, settings.monitoring)
            + clock_warnings(current) + standby_warnings(current) + globals_warnings(current)
            + incremental_warnings(current)
            + disk_warnings(settings.backup_root, settings.monitoring))
