"""PITR drills: the latest base backup and the WAL archive restored into a scratch cluster, started on a
free port, recovered to the end of the archive and promoted, then checked like a logical drill (the
target's `drill.assertions`, read-only) before it is stopped and removed.

The drill's record (status, checks, the recovery time as RTO, the last transaction recovery replayed) goes
into the base backup's manifest and the event log, like a logical drill's; `pgbeat status` and `/metrics`
read it from there. The scratch cluster lives in a new folder of the system's temporary directory
(`$TMPDIR/pgbeat-pitr-drill-*`, 0711 so that the server's user, who runs it, reaches its 0700 data
directory, which BACKUP_ROOT's 0700 folders would not let it) and is stopped and removed whatever happens.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from pgbeat.catalog.manifest import manifest_path, update_manifest
from pgbeat.errors import PgbeatError
from pgbeat.fsutil import remove_path
from pgbeat.notify import Event, send_event
from pgbeat.physical.pitr import RecoveryGoal, base_backups, restore_pitr, server_program, server_user
from pgbeat.postgres.client import connect
from pgbeat.restore.drill import DrillResult, run_assertions
from pgbeat.restore.restore import identities_for
from pgbeat.settings import Settings

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_pitr_drill(settings: Settings, target_name: str, *, pgbeat: str | None = None, timeout: float = 3600,
                   now: Callable[[], datetime] = lambda: datetime.now(UTC),
                   on_step: Callable[[str, str], None] = lambda step, text: None) -> DrillResult:
    """Drill `target_name`'s newest base backup with its WAL (see the module); record it; return it."""
    target = settings.target(target_name)
    started, t0 = now(), time.monotonic()
    result = DrillResult(target=target.name, backup="", status="failed", at=started.isoformat(), duration_s=0.0,
                         server="127.0.0.1 (scratch cluster)")
    bases = base_backups(settings, target.name)
    entry = bases[-1] if bases else None
    work = Path(tempfile.mkdtemp(prefix="pgbeat-pitr-drill-"))
    work.chmod(0o711)  # the server's user enters it to reach its data directory
    data = work / "data"
    try:
        if entry is None:
            raise PgbeatError(f"{target.name} has no verified base backup to drill",
                              hint=f"take one: pgbeat backup base --target {target.name}")
        result.backup = entry.path.name
        port = free_port()
        pitr = restore_pitr(settings, target, RecoveryGoal("latest"), data, start=True, port=port,
                            identities=identities_for(target, None), pgbeat=pgbeat, timeout=timeout,
                            on_step=on_step)
        result.restore_s = round(sum(pitr.steps.values()), 3)  # the recovery time objective, as measured
        chained = entry.manifest.chain is not None and entry.manifest.chain.incremental
        result.checks.append("integrity: checksums, pg_verifybackup of the unpacked base backup"
                             + (" (its chain combined by pg_combinebackup)" if chained else ""))
        result.checks.append(f"recovered to the end of the archive and promoted ({pitr.reached or 'no transaction'}"
                             " replayed last)")
        result.reached = pitr.reached
        with connect(target.model_copy(update={"host": "127.0.0.1", "port": port})) as conn:
            tables = conn.execute("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                  "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN "
                                  "('pg_catalog', 'information_schema')").fetchone()[0]
            result.checks.append(f"{target.dbname} answers with {tables} table(s)")
            checks, problems = run_assertions(conn, target.drill.assertions, target.drill.statement_timeout)
        result.checks += checks
        result.problems += problems
        result.status = "passed" if not result.problems else "failed"
        if not target.drill.assertions:
            result.warnings.append("no drill.assertions: the cluster recovered and answers, no data was proven")
    except PgbeatError as exc:
        result.problems += [exc.message, *exc.details[-5:]]
    except psycopg.Error as exc:
        result.problems.append(f"the recovered cluster refused the checks: {str(exc).strip().splitlines()[0]}")
    finally:
        stop_scratch(settings, data)
        remove_path(work)
    result.duration_s = round(time.monotonic() - t0, 3)
    if entry is not None:
        record = result.record()
        update_manifest(manifest_path(entry.path), lambda m: m.record_drill(record))
    send_event(settings, Event(
        kind="drill_passed" if result.passed else "drill_failed", target=target.name, tier="base",
        run_id=entry.manifest.run_id if entry else "-", node=settings.node, at=now().isoformat(),
        file=str(entry.path) if entry else None, duration_s=result.duration_s,
        step=None if result.passed else "drill", reason=None if result.passed else "PITR drill failed",
        details=result.problems[:10], warnings=list(result.warnings)))
    log.log(logging.INFO if result.passed else logging.ERROR, "PITR drill of %s %s in %.1fs", target.name,
            result.status, result.duration_s)
    return result


def stop_scratch(settings: Settings, data) -> None:
    """Stop the scratch cluster if it runs (immediately: it is thrown away)."""
    if (data / "postmaster.pid").exists():
        subprocess.run([*server_user(), server_program(settings, data, "pg_ctl"), "-D", str(data), "-m",
                        "immediate", "-w", "stop"], capture_output=True, timeout=120)
