"""What a destination holds, read from the manifests stored there: listing and scrubbing its copies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pgbeat import errors
from pgbeat.catalog.manifest import order_key
from pgbeat.settings import Settings

if TYPE_CHECKING:
    from pgbeat.storage.destinations import RemoteEntry


def destination_entries(settings: Settings, destination: str, target: str | None = None,
                        tier: str | None = None) -> list[RemoteEntry]:
    """Given a destination's name (and optionally one target and tier), return the backups stored there
    whose data is present, from their manifests, oldest first. Raise UnknownTargetError if no target
    has a destination of that name."""
    from pgbeat.discovery import shelf_members
    from pgbeat.storage.destinations import open_storage, remote_entries

    users = [t for t in settings.configured() if any(d.name == destination for d in t.destinations)]
    if not users:
        raise errors.UnknownTargetError(f"No target has a destination named {destination!r}")
    entries: list[RemoteEntry] = []
    for config in users:
        # A whole-server target's copies are its databases' (those with backups on the local shelf).
        names = list(shelf_members(settings, config.name)) if config.whole_server else [config.name]
        names = [name for name in names if not target or name == target]
        if not names:
            continue
        with open_storage(config.destination(destination)) as storage:
            for t in [tier] if tier else config.tiers:
                for name in names:
                    entries += [e for e in remote_entries(settings, storage, destination, name, t) if e.exists]
    return sorted(entries, key=order_key)


@dataclass
class CopyCheck:
    """One copy at a destination checked against its manifest: `problem` is None when it matches."""

    entry: RemoteEntry
    problem: str | None = None


@dataclass
class ScrubReport:
    """Every copy at `destination`, checked (size and checksum, or with `deep` every file read back against
    the manifest's per-file SHA-256)."""

    destination: str
    checks: list[CopyCheck] = field(default_factory=list)

    @property
    def bad(self) -> list[CopyCheck]:
        return [c for c in self.checks if c.problem is not None]

    @property
    def exit_code(self) -> int:
        """A copy that does not match its manifest fails verification (VerifyError's code)."""
        return errors.VerifyError.exit_code if self.bad else errors.EXIT_OK


def scrub(settings: Settings, destination: str, deep: bool = False,
          on_check: Callable[[CopyCheck], None] = lambda check: None) -> ScrubReport:
    """Given a destination's name, check each copy there against its manifest (size and checksum, or
    every file read back and compared with the manifest with `deep`), telling `on_check` of each as it
    is done; return the report. Raise UnknownTargetError if no target has that destination."""
    from pgbeat.storage.destinations import open_storage, storage_pool
    from pgbeat.storage.verification import verify_copy

    report = ScrubReport(destination)
    with storage_pool() as storages:  # one per target: each target's spec of the destination may differ
        for entry in destination_entries(settings, destination):
            if entry.manifest.target not in storages:
                storages[entry.manifest.target] = open_storage(
                    settings.target(entry.manifest.target).destination(destination))
            check = CopyCheck(entry)
            try:
                verify_copy(storages[entry.manifest.target], entry.path, entry.manifest, deep=deep)
            except errors.PgbeatError as exc:
                check.problem = exc.message
            report.checks.append(check)
            on_check(check)
    return report
