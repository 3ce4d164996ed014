"""`pgbeat config check`: what a run will need, checked before a run needs it.

Each check is a plain function returning `Check` records, so the command line only renders them:
- BACKUP_ROOT: a writable folder (checked when the settings are loaded) with free space above the
  monitoring thresholds;
- each target: its server answers, and its version; the client programs chosen for that major
  (pgbeat.postgres.clients: a warning when none of its own major is installed and a newer one runs, a
  problem when none can dump it); its user can read every table, sequence and schema pg_dump will lock
  and copy; the rights a restore into it and a drill on the drill server need (the same `missing_rights`
  the restore checks);
- each destination: reachable with its credentials, its bucket or folder there, by writing, reading back
  and deleting a small probe object under the destination's prefix (nothing else is touched);
- with a broker: Redis answers, and a live worker consumes the queue backups are sent to.

A check that could not reach something says so with `unreachable` (the command exits 5); any other
problem exits 1; `warning` is printed and does not fail the command.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pgbeat.errors import PgbeatError
from pgbeat.runlog import human_size
from pgbeat.settings import PHYSICAL_TIERS, DestinationSpec, Settings, Target

PROBE_PREFIX = ".pgbeat-probe-"
# Relations pg_dump reads (tables, partitioned tables, sequences, materialized views) that the user cannot.
UNREADABLE = """
SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'S', 'm') AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
  AND NOT (has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT'))
ORDER BY 1
"""


@dataclass
class Check:
    subject: str  # "BACKUP_ROOT", a target's name, "erp -> vault", "broker"
    what: str  # what was checked
    problem: str | None = None  # None: passed
    detail: str = ""  # what was found (a version, the free space)
    unreachable: bool = False
    warning: bool = False

    @property
    def ok(self) -> bool:
        return self.problem is None


def check_backup_root(settings: Settings) -> Check:
    root = settings.backup_root
    existing = next(p for p in (root, *root.parents) if p.exists())  # the first run creates the rest
    usage = shutil.disk_usage(existing)
    percent = 100.0 * usage.free / usage.total if usage.total else 100.0
    found = f"{human_size(usage.free)} free ({percent:.0f}%)" + ("" if existing == root else
                                                                f", created by the first run in {existing}")
    monitoring = settings.monitoring
    if percent < monitoring.min_free_percent or usage.free < monitoring.min_free_bytes:
        return Check("BACKUP_ROOT", "free space", f"only {found} on {settings.backup_root}", warning=True)
    return Check("BACKUP_ROOT", "free space", detail=f"{settings.backup_root}: {found}")


def check_target(settings: Settings, target: Target) -> Iterator[Check]:
    from pgbeat.postgres.client import connect
    from pgbeat.postgres.clients import client_for_server, server_version

    try:
        conn = connect(target)
    except PgbeatError as exc:
        yield Check(target.name, "connection", exc.message, unreachable=True)
        return
    with conn:
        version = server_version(conn)
        user = conn.execute("SELECT current_user").fetchone()[0]
        yield Check(target.name, "connection", detail=f"{target.describe()}, PostgreSQL {version}")
        try:
            choice = client_for_server(settings, target, conn)
        except PgbeatError as exc:
            choice = None
            yield Check(target.name, "client programs", exc.message + (f" ({exc.hint})" if exc.hint else ""))
        else:
            used = f"pg_dump {choice.client.version} in {choice.client.bin_dir}"
            if choice.note:
                yield Check(target.name, "client programs", choice.note, detail=used, warning=True)
            else:
                yield Check(target.name, "client programs", detail=used)
        unreadable = [row[0] for row in conn.execute(UNREADABLE).fetchall()]
        if unreadable:
            shown = ", ".join(unreadable[:5]) + (f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else "")
            yield Check(target.name, "dump rights", f"{user} cannot read {len(unreadable)} relation(s) pg_dump "
                                                    f"would dump: {shown} (GRANT SELECT, and USAGE on the schema, "
                                                    "or make it a member of pg_read_all_data)")
        else:
            yield Check(target.name, "dump rights", detail=f"{user} reads every table")
        yield from incremental_check(target, conn)
        superuser, replication = conn.execute("SELECT rolsuper, rolsuper OR rolreplication FROM pg_roles "
                                              "WHERE rolname = current_user").fetchone()
    if any(tier not in PHYSICAL_TIERS for tier in target.enabled_tiers()):
        yield globals_check(target, user, superuser)
    needs = [what for what, needed in (("base backups", any(t in PHYSICAL_TIERS for t in target.enabled_tiers())),
                                       ("the WAL receiver", target.wal.receiver)) if needed]
    if needs:
        yield replication_check(target, user, replication, " and ".join(needs),
                                choice.program("psql") if choice is not None else None)
    yield from rights_check(target, target.name, "restore rights", like=True)
    if target.drill.enabled:
        yield from rights_check(target.drill_server(), target.name, "drill rights", like=False)


def check_server(settings: Settings, server: Target) -> Iterator[Check]:
    """A whole-server target: the databases a run would back up now (and those it leaves out, and why),
    then the checks of a listed target for each of them."""
    from pgbeat.discovery import discover

    found = discover(settings, server)
    if found.error is not None:
        yield Check(server.name, "databases: all", f"cannot list the databases: {found.error}", unreachable=True)
        return
    left_out = [*(f"{db!r} (excluded)" for db in found.excluded),
                *(f"{db!r} ({why})" for db, why in found.skipped.items())]
    names = ", ".join(f"{db!r} as {name}" for name, db in found.databases.items()) or "none"
    yield Check(server.name, "databases: all", detail=f"{len(found.databases)} found: {names}"
                + (f"; left out: {', '.join(left_out)}" if left_out else ""))
    for warning in found.warnings():
        yield Check(server.name, "databases: all", warning, warning=True)
    for dbname in found.databases.values():
        yield from check_target(settings, server.for_database(dbname))


def globals_check(target: Target, user: str, superuser: bool) -> Check:
    """Whether the globals beside each logical backup will hold the roles' passwords (pgbeat.postgres.globals)."""
    if superuser:
        return Check(target.name, "globals", detail=f"{user} is a superuser: pg_dumpall --globals-only with the "
                                                    "roles' password hashes")
    return Check(target.name, "globals", f"{user} is not a superuser: the globals are dumped with "
                                         "--no-role-passwords (roles restored from them have no password)",
                 warning=True)


def replication_check(target: Target, user: str, replication: bool, needs: str, psql: str | None) -> Check:
    """Whether `target`'s user may open the replication connection `needs` (pg_basebackup, pg_receivewal):
    the REPLICATION attribute, then a real replication connection (the server's pg_hba.conf must have a
    `replication` line for it, which no SQL query can see)."""
    import subprocess

    from pgbeat.postgres.client import client_env
    from pgbeat.postgres.process import last_error_line

    if not replication:
        return Check(target.name, "replication", f"{user} has neither REPLICATION nor SUPERUSER: {needs} will be "
                                                 f"refused (ALTER ROLE {user} REPLICATION)")
    if psql is None:
        return Check(target.name, "replication", "no psql to try a replication connection with", warning=True)
    with tempfile.TemporaryDirectory(prefix="pgbeat-check-") as folder:
        try:
            done = subprocess.run([psql, "--no-password", "-X", "-A", "-t", "-c", "IDENTIFY_SYSTEM", "-d",
                                   f"{target.conninfo()} replication=true"], env=client_env(target, Path(folder)),
                                  capture_output=True, text=True, timeout=max(30, target.connect_timeout * 2))
        except subprocess.TimeoutExpired:
            return Check(target.name, "replication", f"a replication connection for {needs} did not answer",
                         unreachable=True)
    if done.returncode != 0:
        reason = last_error_line(done.stderr.splitlines()) or f"psql exited with {done.returncode}"
        return Check(target.name, "replication", f"a replication connection for {needs} was refused: {reason} "
                                                 "(pg_hba.conf needs a `host replication` line for this user)")
    return Check(target.name, "replication", detail=f"{user} may open the replication connection of {needs}")


def incremental_check(target: Target, conn) -> Iterator[Check]:
    """A base tier with `full_every_days`: whether the server takes incremental base backups (PostgreSQL 17
    or later, summarize_wal on, a target without encryption); a warning saying why not, since the tier
    then takes full ones (pgbeat.physical.incremental)."""
    from pgbeat.physical.incremental import FIRST_MAJOR, ServerFacts, unsupported
    from pgbeat.postgres.clients import server_major
    from pgbeat.settings import PHYSICAL_TIERS

    tiers = [t for t in PHYSICAL_TIERS if target.runs_tier(t) and target.tiers[t].full_every_days is not None]
    if not tiers:
        return
    major = server_major(conn)
    summarize = conn.execute("SHOW summarize_wal").fetchone()[0] == "on" if major >= FIRST_MAJOR else None
    why = unsupported(ServerFacts(major=major, summarize_wal=summarize))
    if why is None and target.encryption is not None:
        why = "the target is encrypted: a backup worker cannot read its base backups, so every base backup is full"
    every = target.tiers[tiers[0]].full_every_days
    if why:
        yield Check(target.name, "incremental base backups", why, warning=True)
    else:
        yield Check(target.name, "incremental base backups",
                    detail=f"summarize_wal on: a full base backup every {every} day(s), incremental ones between")


def rights_check(server: Target, subject: str, what: str, *, like: bool) -> Iterator[Check]:
    """The rights a restore in place (`like`) or a drill (a new scratch database) needs on `server`."""
    from pgbeat.postgres.client import MAINTENANCE_DB, connect
    from pgbeat.restore.restore import database_properties, missing_rights

    try:
        with connect(server, MAINTENANCE_DB) as admin:
            properties = database_properties(admin, server.dbname) if like else None
            problems = missing_rights(admin, server.dbname if like else None, properties)
    except PgbeatError as exc:
        yield Check(subject, what, exc.message, unreachable=True)
        return
    where = f"on {server.describe()}"
    if problems:
        yield Check(subject, what, f"{len(problems)} missing {where}: " + "; ".join(problems))
    else:
        yield Check(subject, what, detail=where)


def check_destination(spec: DestinationSpec, subject: str) -> Check:
    """Write, read back and delete a small probe object at `spec` (its own retries left out: a check says
    at once what a run would retry for minutes)."""
    from pgbeat.storage.destinations import open_storage

    key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    payload = f"pgbeat config check {key}\n".encode()
    with tempfile.TemporaryDirectory(prefix="pgbeat-probe-") as scratch:
        source, back = Path(scratch) / "probe", Path(scratch) / "back"
        source.write_bytes(payload)
        try:
            with open_storage(spec.model_copy(update={"retries": 1})) as storage:
                storage.put(source, key, hashlib.sha256(payload).hexdigest())
                try:
                    storage.get(key, back)
                finally:
                    storage.delete(key)
        except PgbeatError as exc:
            return Check(subject, "write, read, delete", exc.message, unreachable=True)
        except Exception as exc:  # an SDK's own error class: said in one line, never a traceback
            return Check(subject, "write, read, delete", f"{type(exc).__name__}: {exc}", unreachable=True)
        if back.read_bytes() != payload:
            return Check(subject, "write, read, delete", "what was read back differs from what was written")
    return Check(subject, "write, read, delete", detail=f"{spec.kind} {storage.describe('')}")


def check_broker(settings: Settings) -> Iterator[Check]:
    from pgbeat.coordination import redis_client
    from pgbeat.coordination.dispatch import DEFAULT_QUEUE, broker_problem
    from pgbeat.coordination.runs import NodeRegistry

    problem = broker_problem(settings)
    if problem:
        yield Check("broker", "Redis answers", problem, unreachable=True)
        return
    yield Check("broker", "Redis answers", detail="yes")
    alive = NodeRegistry(redis_client(settings)).alive_nodes()
    if not alive:
        yield Check("broker", f"a live worker on queue {DEFAULT_QUEUE}",
                    "no worker has a heartbeat in Redis: backups sent now would wait (start one: celery -A "
                    "workers.app worker)", unreachable=True)
    else:
        yield Check("broker", f"a live worker on queue {DEFAULT_QUEUE}", detail=", ".join(sorted(alive)))


def run_checks(settings: Settings) -> Iterator[Check]:
    """Every check of `pgbeat config check`, in the order they are printed."""
    yield check_backup_root(settings)
    for target in settings.configured():
        if target.whole_server:
            yield from check_server(settings, target)
        else:
            yield from check_target(settings, target)
        for spec in target.destinations:
            yield check_destination(spec, f"{target.name} -> {spec.name}")
    if not settings.embedded:
        yield from check_broker(settings)
