"""A walk of a target's local WAL archive: is the WAL after each base backup all there, and how far does it go.

From the start segment of the oldest base backup, the archive must hold every segment in order up to the
newest one stored. PostgreSQL names segments by timeline, log and segment number; a promotion forks a
new timeline whose segments start at the switch point, so at each position the walk follows the highest
timeline, at or above the one it is on, that has the segment there (what recovery with the latest
timeline replays; the switch is seen from the names, so an encrypted archive is walked the same). A
segment missing in between is a gap: recovery from any base backup before it stops there, so the
restorable window really ends at the gap, whatever is stored after it.

The segment size is not in the names. A segment's number within its log runs up to 2^32 / size - 1; the
walk assumes PostgreSQL's default 16 MiB (256 per log) unless the archive holds a higher number, and then
takes the smallest power of two above the highest number seen.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pgbeat.catalog.manifest import Entry
from pgbeat.settings import Settings
from pgbeat.wal.archive import HISTORY_DIR, parse_stored, wal_root

SEGMENT_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
DEFAULT_PER_LOG = 256  # 16 MiB segments
MAX_GAPS_LISTED = 20


@dataclass
class ArchiveWalk:
    """What the walk found for one target."""

    target: str
    start: str | None = None  # the oldest base backup's start segment
    end: str | None = None  # the last segment reached without a gap
    newest: str | None = None  # the newest segment stored (after a gap, beyond `end`; also with no base backup)
    end_at: datetime | None = None  # when `end` was archived (its stored file's time)
    segments: int = 0  # segments walked from `start` to `end`
    gaps: list[str] = field(default_factory=list)  # missing segments (the first MAX_GAPS_LISTED)
    gap_count: int = 0
    timelines: list[int] = field(default_factory=list)  # the timelines walked, in order

    @property
    def whole(self) -> bool:
        return self.gap_count == 0


def split(segment: str) -> tuple[int, int, int]:
    tli, log, seg = SEGMENT_RE.match(segment).groups()
    return int(tli, 16), int(log, 16), int(seg, 16)


def name(tli: int, log: int, seg: int) -> str:
    return f"{tli:08X}{log:08X}{seg:08X}"


def segments_after(older: str, newer: str, segment_size: int) -> int:
    """How many segments `newer` is after `older` in the WAL, whatever their timelines (negative when it is
    before), for the server's `segment_size` in bytes."""
    per_log = (1 << 32) // segment_size
    (_, old_log, old_seg), (_, new_log, new_seg) = split(older), split(newer)
    return (new_log - old_log) * per_log + new_seg - old_seg


def walk_archive(settings: Settings, target: str, bases: list[Entry]) -> ArchiveWalk:
    """Walk `target`'s archive from the start of the oldest of `bases` (its physical base backups)."""
    walk = ArchiveWalk(target=target)
    starts = [e.manifest.physical.start_wal for e in bases if e.manifest.physical and e.manifest.physical.start_wal]
    root = wal_root(settings, target)
    if not root.is_dir():
        return walk
    stored: dict[str, float] = {}  # segment -> when its file was stored
    for folder in os.listdir(root):
        path = root / folder
        if folder == HISTORY_DIR or not path.is_dir():
            continue
        for entry in os.scandir(path):
            parsed = parse_stored(entry.name, folder)
            if parsed is not None and SEGMENT_RE.match(parsed.wal):
                stored[parsed.wal] = entry.stat().st_mtime
    if not stored:
        return walk
    timelines_at: dict[tuple[int, int], list[int]] = {}
    for segment in stored:
        tli, log, seg = split(segment)
        timelines_at.setdefault((log, seg), []).append(tli)
    last = max(timelines_at)
    walk.newest = name(max(timelines_at[last]), *last)  # with or without a base backup: how far archiving got
    if not starts:
        return walk
    highest = max(seg for _, seg in timelines_at)
    per_log = DEFAULT_PER_LOG if highest < DEFAULT_PER_LOG else 1 << highest.bit_length()
    walk.start = min(starts, key=lambda s: s[8:])
    tli, log, seg = split(walk.start)
    walk.timelines = [tli]
    while (log, seg) <= last:
        there = [t for t in timelines_at.get((log, seg), []) if t >= tli]
        if there:
            if max(there) != tli:
                tli = max(there)
                walk.timelines.append(tli)
            if not walk.gap_count:
                walk.end, walk.segments = name(tli, log, seg), walk.segments + 1
        else:
            walk.gap_count += 1
            if len(walk.gaps) < MAX_GAPS_LISTED:
                walk.gaps.append(name(tli, log, seg))
        seg += 1
        if seg == per_log:
            log, seg = log + 1, 0
    if walk.end is not None:
        walk.end_at = datetime.fromtimestamp(stored[walk.end], UTC)
    return walk
