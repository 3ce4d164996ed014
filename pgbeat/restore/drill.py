"""Restore drills: routine proof that the backups restore (no peer tool schedules them).

A drill takes the latest verified backup of a target, restores it into a scratch database on the drill
server (by default the target's own server; set `drill.host` to keep the load off production), checks
every table's row count against the manifest and runs the configured SQL assertions read-only, measures
the restore time (the RTO), records the result in the backup's manifest, drops the scratch database,
and notifies. A failed drill is a failure notification like a failed backup.

The scratch database is journaled like a restore's temporary database (pgbeat.restore.journal): a drill
stopped by a signal drops it at once, and one killed outright has it dropped by the next pgbeat run.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import psycopg
from psycopg import sql

from pgbeat.catalog.manifest import DrillRecord, Entry, manifest_path, update_manifest
from pgbeat.errors import PgbeatError
from pgbeat.faults import fault_point
from pgbeat.fsutil import private_dir, remove_path
from pgbeat.notify import Event, send_event
from pgbeat.pipeline.record import WORK_DIR
from pgbeat.postgres.client import MAINTENANCE_DB, connect, ident
from pgbeat.restore.journal import (
    SCRATCH_PREFIX,
    Interrupted,
    Journal,
    database_oid,
    interruptible,
    new_run_id,
    phase_points,
    settle,
)
from pgbeat.restore.restore import (
    check_rights,
    check_roles,
    count_rows,
    first_line,
    globals_summary,
    identities_for,
    latest_backup,
    load_archive,
    load_plain,
    loading_client,
    missing_roles,
    plaintext_of,
    restore_globals,
)
from pgbeat.settings import Settings
from pgbeat.steps.verify import verify_backup

log = logging.getLogger(__name__)

# Fault points (pgbeat.faults) at the start, middle and end of every phase of a drill.
CREATE = phase_points("drill", "create", "the journal names the scratch database; it does not exist yet",
                      "the scratch database exists; the journal has not recorded its OID yet",
                      "the scratch database exists and is journaled")
LOAD = phase_points("drill", "load", "the scratch database is empty", "the dump is partly loaded",
                    "the dump is loaded")
CHECK = phase_points("drill", "check", "nothing checked yet", "row counts checked; assertions not yet run",
                     "every check ran; the scratch database is not yet dropped")


class DrillInterrupted(PgbeatError):
    """A signal stopped a drill; its scratch database was dropped and the failed drill recorded."""


class DrillResult(DrillRecord):
    """A drill as its caller sees it: the record kept in the backup's manifest, and which backup it was."""

    target: str
    backup: str

    def as_json(self) -> dict:
        return self.model_dump(mode="json")

    def record(self) -> DrillRecord:
        return DrillRecord.model_validate(self.model_dump(exclude={"target", "backup"}))


def run_assertions(conn: psycopg.Connection, assertions: list[str], timeout_s: int) -> tuple[list[str], list[str]]:
    """Run each assertion read-only; it passes when it returns one row whose first value is true."""
    checks, problems = [], []
    conn.execute("SET default_transaction_read_only = on")
    conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(f"{timeout_s}s")))
    for assertion in assertions:
        try:
            row = conn.execute(assertion).fetchone()
        except psycopg.Error as exc:
            problems.append(f"assertion failed to run: {assertion}: {str(exc).strip().splitlines()[0]}")
            continue
        if row and row[0] is True:
            checks.append(f"assertion holds: {assertion}")
        else:
            problems.append(f"assertion does not hold: {assertion} (returned {row[0] if row else 'no row'})")
    return checks, problems


def run_drill(settings: Settings, target_name: str, entry: Entry | None = None,
              now=lambda: datetime.now(UTC)) -> DrillResult:
    """Drill the latest backup of `target_name` (or `entry`); record and notify the result; return it.

    Raise DrillInterrupted after recording a drill stopped by SIGTERM, SIGHUP or SIGINT.
    """
    target = settings.target(target_name)
    policy = target.drill
    server = target.drill_server()
    started, t0 = now(), time.monotonic()
    result = DrillResult(target=target.name, backup="", status="failed", at=started.isoformat(), duration_s=0.0,
                         server=server.describe().rsplit("/", 1)[0])
    run_id = new_run_id()
    scratch = f"{SCRATCH_PREFIX}{run_id}"
    work = settings.backup_root / WORK_DIR / f"drill-{run_id}"
    interrupted: Interrupted | None = None
    with interruptible() as guard:
        journal = None
        try:
            try:
                entry = entry or latest_backup(settings, target.name, policy.tier)
                result.backup = entry.path.name
                with connect(server, MAINTENANCE_DB) as admin:
                    check_rights(admin, None, None, "create a scratch database for the drill", result.server)
                    # A drill server of its own may lack the roles that own the backup's objects: they are
                    # created from its globals file first (with_globals), else the drill fails naming them.
                    use_globals = policy.with_globals and bool(missing_roles(admin, entry.manifest))
                    check_roles(admin, entry.manifest, use_globals, result.server)
                verify_backup(entry.path, settings, with_globals=use_globals)
                journal = Journal.begin(settings, run_id, kind="drill", target=target, server="drill",
                                        temporary=scratch, phase="verify", backup=str(entry.path), work=[str(work)])
                private_dir(work)
                plain = plaintext_of(settings, entry, identities_for(target, None), work)
                result.checks.append("integrity: checksums, decompression and completeness"
                                     + (" (after decryption)" if plain is not entry else ""))
                if use_globals:
                    with connect(server, MAINTENANCE_DB) as admin:
                        client = loading_client(settings, server, admin, plain.manifest)
                    applied = restore_globals(client, server, entry, identities_for(target, None), work)
                    result.checks.append(f"globals applied first: {globals_summary(applied)}")
                journal.write("create")  # from here on the scratch database may exist
                with connect(server, MAINTENANCE_DB) as admin:
                    client = loading_client(settings, server, admin, plain.manifest)
                    fault_point(CREATE.start)
                    admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(ident(scratch)))
                    fault_point(CREATE.middle)
                    journal.write("load", temporary_oid=database_oid(admin, scratch))
                fault_point(CREATE.end)
                fault_point(LOAD.start)
                t_restore = time.monotonic()
                if plain.manifest.format == "plain":
                    load_plain(client, server, scratch, plain, work, midway=LOAD.middle)
                else:
                    load_archive(client, server, scratch, plain, 2, work, midway=LOAD.middle)
                result.restore_s = round(time.monotonic() - t_restore, 3)
                fault_point(LOAD.end)
                journal.write("check")
                fault_point(CHECK.start)
                with connect(server, scratch) as conn:
                    problems = count_rows(conn, plain.manifest.tables)
                    result.checks.append(f"row counts of {len(plain.manifest.tables)} table(s) against the manifest")
                    fault_point(CHECK.middle)
                    checks, failed = run_assertions(conn, policy.assertions, policy.statement_timeout)
                result.checks += checks
                result.problems = problems + failed
                result.status = "passed" if not result.problems else "failed"
                if not plain.manifest.tables and not policy.assertions:
                    result.warnings.append("nothing checked but integrity: the backup has 0 tables and the drill "
                                           "no assertions (drill.assertions); the file restores, no data was proven")
                fault_point(CHECK.end)
            except PgbeatError as exc:
                result.problems.append(exc.message)
                result.problems += exc.details[-5:]
            except psycopg.Error as exc:
                result.problems.append(f"PostgreSQL refused the drill: {first_line(exc)}")
            finally:
                with guard.masked():
                    remove_path(work)
                    if journal is not None:
                        try:
                            settle(server, journal.record)
                            journal.close()
                        except PgbeatError as exc:
                            journal.release()  # the next pgbeat run on this host drops it
                            log.warning("could not drop drill database %s: %s", scratch, exc.message)
        except Interrupted as exc:  # after the cleanup above has run
            interrupted = exc
            result.status = "failed"
            result.problems.append(f"interrupted by {exc.signal_name}")
    result.duration_s = round(time.monotonic() - t0, 3)
    if entry is not None:
        record = result.record()
        update_manifest(manifest_path(entry.path), lambda m: m.record_drill(record))
    send_event(settings, Event(
        kind="drill_passed" if result.passed else "drill_failed", target=target.name,
        tier=entry.manifest.tier if entry else "-", run_id=entry.manifest.run_id if entry else "-",
        node=settings.node, at=now().isoformat(), file=str(entry.path) if entry else None,
        duration_s=result.duration_s, step=None if result.passed else "drill",
        reason=None if result.passed else "restore drill failed", details=result.problems[:10],
        warnings=list(result.warnings)))
    log.log(logging.INFO if result.passed else logging.ERROR, "drill of %s %s in %.1fs", target.name,
            result.status, result.duration_s)
    if interrupted is not None:
        raise DrillInterrupted(f"Drill of {target.name} interrupted by {interrupted.signal_name}; its scratch "
                               "database was dropped and the failed drill recorded")
    return result
