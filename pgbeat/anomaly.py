"""Warnings that are not failures: the signs of a backup that "worked" but should worry a DBA.

- much smaller than the previous backups of the same target and tier (a dump that silently lost a
  table: notes/peers.md, complaint 1), and tables that were in the previous backup but are gone;
- much slower than usual;
- BACKUP_ROOT running out of space.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from pgbeat.catalog import Entry, list_backups
from pgbeat.runlog import human_size
from pgbeat.settings import MonitoringSpec, Settings


def disk_warnings(backup_root: Path, monitoring: MonitoringSpec) -> list[str]:
    usage = shutil.disk_usage(backup_root)
    percent = 100.0 * usage.free / usage.total if usage.total else 100.0
    if percent < monitoring.min_free_percent or usage.free < monitoring.min_free_bytes:
        return [f"only {human_size(usage.free)} ({percent:.1f}%) free on {backup_root}"]
    return []


def comparison_warnings(current: Entry, previous: list[Entry], monitoring: MonitoringSpec) -> list[str]:
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
        warnings.append(f"backup is {human_size(measure(current))}, {100 * measure(current) / median_size:.0f}% of "
                        f"the median of the previous {len(history)} ({human_size(int(median_size))}): "
                        "was data lost?")
    gone = sorted(set(history[-1].manifest.tables) - set(m.tables))
    if gone:
        warnings.append(f"{len(gone)} table(s) of the previous backup are missing: {', '.join(gone[:5])}")
    durations = [e.manifest.duration_s for e in history if e.manifest.duration_s]
    if durations and m.duration_s and m.duration_s > monitoring.min_duration_s:
        median_duration = statistics.median(durations)
        if m.duration_s > monitoring.duration_growth_ratio * median_duration:
            warnings.append(f"backup took {m.duration_s:.0f}s, {m.duration_s / median_duration:.1f}x the median "
                            f"of the previous {len(durations)} ({median_duration:.0f}s)")
    return warnings


def backup_warnings(settings: Settings, current: Entry) -> list[str]:
    m = current.manifest
    entries = list_backups(settings.backup_root, m.target, m.tier)
    previous = [e for e in entries if e.manifest.started_at < m.started_at]
    return comparison_warnings(current, previous, settings.monitoring) + disk_warnings(settings.backup_root,
                                                                                        settings.monitoring)
