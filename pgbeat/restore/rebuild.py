"""Rebuilding a database server from its backups, in one command (`pgbeat rebuild SOURCE --onto DEST`).

The plan comes from the shelf, not from the source server (which may be the machine that was lost): every
verified logical backup whose manifest says it was taken of the source's host and port, the newest per
database (by the manifests' server clock, as `restore --latest` picks). Each database is then restored onto
the destination server by the one restore path (`pgbeat.restore.restore.restore`: integrity check, a
temporary database, row counts checked, swapped in, a safety backup of what the destination held), with
the backup's globals applied first (`--with-globals`: roles, memberships, role settings, tablespaces the
destination lacks), so the databases' owners and grants arrive with them. The database whose backup holds
the newest globals goes first, so its roles are the ones created.

One database failing does not stop the others (the report names it, and the command exits non-zero): a
rebuild is what a DBA runs after losing a server, and each database restored is one fewer to do by hand.
Run again, it restores each database again (a safety backup of the copy it replaces is taken each time).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pgbeat.catalog.manifest import Entry, list_backups, newest
from pgbeat.errors import PgbeatError, UsageError
from pgbeat.restore.restore import RESERVED_DATABASES, RestoreInterrupted, RestoreResult, restore
from pgbeat.settings import Settings, Target


@dataclass
class RebuildItem:
    """One database of the source server: the backup that rebuilds it, or why it is left out (`skip`)."""

    database: str
    entry: Entry
    skip: str | None = None


@dataclass
class RebuildOutcome:
    """How one database's restore ended: its result, or the error that stopped it."""

    item: RebuildItem
    result: RestoreResult | None = None
    error: PgbeatError | None = None


@dataclass
class RebuildReport:
    outcomes: list[RebuildOutcome] = field(default_factory=list)
    interrupted: bool = False  # a signal stopped it: the items after the last outcome were not begun

    @property
    def failed(self) -> list[RebuildOutcome]:
        return [o for o in self.outcomes if o.error is not None]


def same_server(a: Target, b: Target) -> bool:
    return (a.host or "", a.port) == (b.host or "", b.port)


def _of_server(entry: Entry, source: Target) -> bool:
    recorded = entry.manifest.database
    return (recorded.get("host") or "", recorded.get("port")) == (source.host or "", source.port)


def rebuild_plan(settings: Settings, source: Target, tier: str | None = None,
                 now: datetime | None = None) -> list[RebuildItem]:
    """Given the target whose server is to be rebuilt, return one item per database that has a verified
    logical backup of that server on the shelf (of `tier`, or any logical tier): the newest, the one with
    the newest globals file first. Raise PgbeatError if there is none."""
    entries = [e for e in list_backups(settings.backup_root, None, tier, kind="logical")
               if e.verified and _of_server(e, source)]
    if not entries:
        raise PgbeatError(f"No verified backup of the server {source.host or 'local socket'}:{source.port} "
                          f"(target {source.name}){' in tier ' + tier if tier else ''} in {settings.backup_root}",
                          hint="pgbeat list shows the backups on this host; fetch the missing ones from a "
                               "destination with `pgbeat fetch URL --to FOLDER`")
    by_database: dict[str, list[Entry]] = {}
    for entry in entries:
        by_database.setdefault(entry.manifest.database.get("dbname") or entry.manifest.target, []).append(entry)
    at = now or datetime.now(UTC)
    items = []
    for database, found in by_database.items():
        entry = newest(found, at)
        skip = None
        if database in RESERVED_DATABASES:
            skip = (f"{database!r} is the destination's own maintenance database or a template: restore its "
                    f"backup by hand, into another name (pgbeat restore {entry.path.name} --into NAME)")
        items.append(RebuildItem(database, entry, skip))
    # Restores carrying a globals file before those without, the newest globals first, then by name.
    items.sort(key=lambda i: (i.entry.manifest.globals is None, -i.entry.manifest.started_at.timestamp(),
                              i.database))
    return items


def rebuild(settings: Settings, items: list[RebuildItem], onto: Target, *, jobs: int = 2,
            identities: list | None = None, force_older: bool = False,
            on_item: Callable[[RebuildItem], None] = lambda item: None,
            on_step: Callable[[str, str], None] | None = None) -> RebuildReport:
    """Restore each item's backup into its database on `onto`'s server (its globals first, when it has
    them); return what happened to each. The caller has confirmed. A database that fails is reported and
    the next one restored; SIGINT, SIGTERM or SIGHUP stop the rebuild after undoing the current restore."""
    report = RebuildReport()
    for item in items:
        if item.skip is not None:
            continue
        on_item(item)
        try:
            result = restore(settings, item.entry, onto, into=item.database, jobs=jobs,
                             confirm=lambda info: True, on_step=on_step, identities=identities,
                             force_older=force_older, with_globals=item.entry.manifest.globals is not None)
        except RestoreInterrupted as exc:
            report.outcomes.append(RebuildOutcome(item, error=exc))
            report.interrupted = True
            break
        except PgbeatError as exc:
            report.outcomes.append(RebuildOutcome(item, error=exc))
            continue
        report.outcomes.append(RebuildOutcome(item, result=result))
    return report


def refuse_same_server(source: Target, onto: Target) -> None:
    """Raise UsageError if `onto` is the server being rebuilt."""
    if same_server(source, onto):
        raise UsageError(f"--onto {onto.name} is the server being rebuilt ({onto.describe()}): a rebuild "
                         "restores onto another server", hint="restore one database in place with pgbeat restore "
                                                             "--latest --target NAME")
