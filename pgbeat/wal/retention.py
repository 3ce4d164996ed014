"""WAL retention: once base backups are rotated, remove exactly the archived WAL no kept base backup needs.

Recovery from a base backup replays WAL from its start segment onwards, on whatever timeline leads to the
recovery target, so a stored WAL file is still needed when its position (log and segment, the last 16
hex digits of a segment's name) is at or after the start segment of the oldest base backup kept, on any
timeline. Everything before that position serves no restore pgbeat can do: it goes, segments, `.partial`
and `.backup` files alike. Timeline `.history` files are never removed (they are tiny, and a restore to a
later timeline reads them all). With no base backup kept, nothing is removed: the archive is never
emptied because its base backups are gone. Each destination's WAL is judged the same way by the base
backups that destination keeps (its own copies, rotated by its own retention), so a destination that
keeps base backups longer keeps their WAL as long.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from pgbeat.catalog.manifest import Entry
from pgbeat.fsutil import fsync_dir, remove_path
from pgbeat.settings import Settings
from pgbeat.wal.archive import HISTORY_DIR, WAL_DIR, StoredWal, archive_lock, parse_stored, wal_root

log = logging.getLogger(__name__)


@dataclass
class WalRemoval:
    """The WAL of one target that no kept base backup needs (removed, or to be removed in a dry run)."""

    target: str
    oldest_needed: str | None  # the start segment of the oldest kept base backup; None: nothing removed
    files: list[str] = field(default_factory=list)  # relative paths under the target's archive

    @property
    def wal_names(self) -> list[str]:
        return [path.rsplit("/", 1)[-1].split("-", 1)[0] for path in self.files]


def position(wal_name: str) -> str:
    """Where a WAL file is in the WAL, whatever its timeline: log and segment of its (first) segment."""
    return wal_name[8:24]


def oldest_start(kept: Iterable[Entry]) -> str | None:
    """The start segment of the oldest of the `kept` base backups that says where it starts, or None."""
    starts = [e.manifest.physical.start_wal for e in kept if e.manifest.physical and e.manifest.physical.start_wal]
    return min(starts, key=position) if starts else None


def needless(stored: StoredWal | None, start: str) -> bool:
    """True when `stored` is a WAL file (not a timeline's history) from before the segment `start`."""
    return (stored is not None and stored.folder != HISTORY_DIR and not stored.wal.endswith(".history")
            and position(stored.wal) < position(start))


def plan_wal_removal(settings: Settings, target: str, kept: Iterable[Entry]) -> WalRemoval:
    """Given the base backups of `target` that stay, list the stored WAL files that none of them needs."""
    start = oldest_start(kept)
    removal = WalRemoval(target=target, oldest_needed=start)
    root = wal_root(settings, target)
    if start is None or not root.is_dir():
        return removal
    for folder in sorted(os.listdir(root)):
        if folder == HISTORY_DIR or not (root / folder).is_dir():
            continue
        for name in sorted(os.listdir(root / folder)):
            stored = parse_stored(name, folder)
            if needless(stored, start):
                removal.files.append(stored.relpath)
    return removal


def remove_unneeded_remote_wal(storage, target: str, kept: Iterable, dry_run: bool = False) -> WalRemoval:
    """Remove (`dry_run`: only list) the WAL of `target` at a destination that none of the base backups kept
    there (`kept`: its RemoteEntries) needs; one listing of its archive there."""
    start = oldest_start(kept)
    removal = WalRemoval(target=target, oldest_needed=start)
    if start is None:
        return removal
    prefix = f"{WAL_DIR}/{target}"
    for info in storage.walk(prefix):
        folder, _, name = info.key[len(prefix) + 1:].rpartition("/")
        stored = parse_stored(name, folder)
        if needless(stored, start):
            removal.files.append(stored.relpath)
    if not dry_run:
        for relpath in removal.files:
            storage.delete(f"{prefix}/{relpath}")
        if removal.files:
            log.info("removed %d WAL file(s) of %s at %s before %s, which no base backup kept there needs",
                     len(removal.files), target, storage.name, start)
    return removal


def remove_unneeded_wal(settings: Settings, target: str, kept: Iterable[Entry], dry_run: bool = False) -> WalRemoval:
    """Remove (`dry_run`: only list) `target`'s stored WAL that no kept base backup needs, under the archive's
    lock (a wal-push publishing meanwhile waits); empty folders go too."""
    kept = list(kept)
    removal = plan_wal_removal(settings, target, kept)
    if dry_run or not removal.files:
        return removal
    root = wal_root(settings, target)
    with archive_lock(root):
        removal = plan_wal_removal(settings, target, kept)  # again, under the lock
        for relpath in removal.files:
            remove_path(root / relpath)
        for folder in sorted({relpath.split("/", 1)[0] for relpath in removal.files}):
            if not any(os.scandir(root / folder)):
                os.rmdir(root / folder)
        fsync_dir(root)
    log.info("removed %d WAL file(s) of %s before %s, which no kept base backup needs", len(removal.files), target,
             removal.oldest_needed)
    return removal
