"""Whole-server targets at run time: which databases a `databases: all` target backs up now.

Each run of a whole-server target asks its server for its databases (`discover`): every database that is
no template, allows connections, is valid (not left half-dropped) and that the target's user may CONNECT
to, kept by the target's `include` and `exclude` glob patterns, becomes a target of its own
(`Target.for_database`, named as pgbeat.settings.servers says), and from there on goes through exactly
the path a listed target does: the same chain, locks, fleet caps, manifests and retention.

A database whose backups are on the shelf under the whole-server target but which is no longer on the
server is *gone*: each run prints so, the first run that finds it gone tells the event log and the
channels (a warning), `pgbeat status` says so too (from the last discovery, kept in
BACKUP_ROOT/logs/discovery/<target>.json), and its backups stay, rotated by the target's tier retention as
before (min_keep keeps the newest ones): a database that disappears never takes its backups with it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pgbeat.errors import PgbeatError
from pgbeat.settings.servers import split_derived

if TYPE_CHECKING:
    from pgbeat.settings import Settings, Target

log = logging.getLogger(__name__)

# Every database of the server with what decides whether a whole-server target may back it up.
# datconnlimit -2 marks a database an interrupted DROP DATABASE left invalid (PostgreSQL 16, 15.4, ...).
DATABASES = """
SELECT datname, datistemplate, datallowconn, datconnlimit = -2 AS invalid,
       has_database_privilege(oid, 'CONNECT') AS may_connect
FROM pg_database ORDER BY datname
"""
# The databases discovery connects to, in order: the maintenance database, else template1.
DISCOVERY_DBS = ("postgres", "template1")


@dataclass
class Discovery:
    """What one discovery of a whole-server target found."""

    server: str  # the whole-server target's name
    at: str  # ISO time of the discovery
    databases: dict[str, str] = field(default_factory=dict)  # target name -> database: backed up
    excluded: list[str] = field(default_factory=list)  # left out by include/exclude
    skipped: dict[str, str] = field(default_factory=dict)  # database -> why (templates, no connections)
    refused: dict[str, str] = field(default_factory=dict)  # database -> why it cannot be backed up (a warning)
    gone: dict[str, str] = field(default_factory=dict)  # target name -> database: backups kept, database gone
    error: str | None = None  # the server could not be asked
    newly_gone: list[str] = field(default_factory=list)  # target names gone since the last recorded discovery

    def warnings(self, only_new: bool = False) -> list[str]:
        """What a run of the whole-server target warns about; with `only_new`, of the gone databases only
        those gone since the last recorded discovery (what the channels are told, once)."""
        lines = [f"database {db!r} of {self.server} is not backed up: {why}" for db, why in self.refused.items()]
        lines += [f"database {db!r} of {self.server} is gone from the server: its backups ({name}) are kept, "
                  "rotated by the tier retention" for name, db in self.gone.items()
                  if not only_new or name in self.newly_gone]
        return lines

    def as_json(self) -> dict:
        return asdict(self)


def discover(settings: Settings, server: Target, now: datetime | None = None) -> Discovery:
    """Ask `server`'s server for its databases and return what a run backs up (see the module); a server
    that cannot be asked is a Discovery with `error` set and no databases."""
    from pgbeat.postgres.client import connect

    found = Discovery(server=server.name, at=(now or datetime.now(UTC)).isoformat())
    rows = None
    for dbname in DISCOVERY_DBS:
        try:
            with connect(server, dbname) as conn:
                rows = conn.execute(DATABASES).fetchall()
            break
        except PgbeatError as exc:
            found.error = exc.message
    if rows is None:
        return found
    found.error = None
    for dbname, template, allow_conn, invalid, may_connect in rows:
        if template:
            found.skipped[dbname] = "a template"
        elif not allow_conn:
            found.skipped[dbname] = "does not allow connections (datallowconn false)"
        elif invalid:
            found.refused[dbname] = "invalid (an interrupted DROP DATABASE): drop it"
        elif not server.selects(dbname):
            found.excluded.append(dbname)
        elif not may_connect:
            found.refused[dbname] = f"{server.user or 'the user'} lacks CONNECT on it (GRANT CONNECT)"
        else:
            try:
                found.databases[server.for_database(dbname).name] = dbname
            except ValueError as exc:
                found.refused[dbname] = str(exc)
    on_server = {row[0] for row in rows}
    found.gone = {name: dbname for name, dbname in shelf_members(settings, server.name).items()
                  if dbname not in on_server}
    return found


def shelf_members(settings: Settings, server: str) -> dict[str, str]:
    """The databases of whole-server target `server` with backups on the local shelf, from the file names
    alone: target name -> database."""
    from pgbeat.catalog.manifest import shelf_census

    members = {}
    for name in shelf_census(settings.backup_root):
        derived = split_derived(name)
        if derived is not None and derived[0] == server:
            members[name] = derived[1]
    return dict(sorted(members.items()))


def record_path(settings: Settings, server: str) -> Path:
    return settings.backup_root / "logs" / "discovery" / f"{server}.json"


def record(settings: Settings, found: Discovery) -> None:
    """Keep `found` as the last discovery of its target (for `pgbeat status`); a server that could not be
    asked leaves the last good one in place. Best effort: a BACKUP_ROOT this process may not write (the
    CLI of a host that sends backups to the workers) is logged, and the backups go on."""
    from pgbeat.fsutil import private_dir, write_atomic

    if found.error is not None:
        return
    path = record_path(settings, found.server)
    try:
        private_dir(path.parent)
        write_atomic(path, json.dumps(found.as_json(), ensure_ascii=False, indent=1).encode())
    except (OSError, PgbeatError) as exc:
        log.warning("cannot record the discovery of %s in %s: %s", found.server, path, exc)


def last_discovery(settings: Settings, server: str) -> Discovery | None:
    """The last discovery recorded of whole-server target `server`, or None."""
    try:
        data = json.loads(record_path(settings, server).read_text(encoding="utf-8"))
        return Discovery(**data)
    except (OSError, ValueError, TypeError):
        return None


def expand(settings: Settings, names: list[str], now: datetime | None = None, *,
           keep: bool = True) -> tuple[list[str], list[Discovery]]:
    """Given target names to back up, some of them whole-server targets, return the names with each
    whole-server target replaced by the databases it discovers now, and each discovery (with `keep`,
    recorded for `pgbeat status`; a dry run keeps nothing)."""
    out: list[str] = []
    found: list[Discovery] = []
    for name in names:
        if name not in settings.servers:
            out.append(name)
            continue
        discovery = discover(settings, settings.servers[name], now)
        last = last_discovery(settings, name)
        discovery.newly_gone = sorted(set(discovery.gone) - set(last.gone if last else {}))
        if keep:
            record(settings, discovery)
        found.append(discovery)
        out.extend(sorted(discovery.databases))
    return list(dict.fromkeys(out)), found


def announce(settings: Settings, found: Discovery, tier: str, run_id: str = "") -> None:
    """Tell the event log and the target's channels what a run's discovery warns about (a database refused,
    at every run; one gone, at the first run that finds it gone: `pgbeat status` keeps saying so), or that
    the server could not be asked (a failure: none of its databases is backed up)."""
    from pgbeat.notify import Event, send_event

    base = {"target": found.server, "tier": tier, "run_id": run_id, "node": settings.node,
            "at": datetime.now(UTC).isoformat()}
    if found.error is not None:
        send_event(settings, Event(kind="failure", step="discover", reason=f"cannot list the databases of "
                                   f"whole-server target {found.server}: {found.error}",
                                   hint="none of its databases was backed up", **base))
    elif found.warnings(only_new=True):
        send_event(settings, Event(kind="warning", warnings=found.warnings(only_new=True), **base))
