"""Restore with a safety net: the seed's `restore.sh FILE`, safe enough for 3 a.m.

In this order:
1. check the backup (checksums against its manifest and `.sha256`, full decompression, completeness);
2. get confirmation (the caller asks the user to type `SIM`) when an existing database is overwritten;
3. take a verified safety backup of the current state, `BACKUP_ROOT/pre_restore_<target>_<stamp>.sql.gz`;
4. restore into a temporary database with the original's owner, encoding, locale, settings and grants,
   check its tables and row counts against the manifest, then swap it in with two renames in one
   transaction (new connections refused and other sessions disconnected first). Until that commit the
   original is untouched; a failure anywhere drops the temporary database and leaves it as it was;
5. connect to the restored database and confirm every table of the manifest is there.
"""

from __future__ import annotations

import logging
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgbeat import runlog, sqlscan
from pgbeat.catalog import (
    STAMP_FORMAT,
    Entry,
    checksum_path,
    list_backups,
    manifest_path,
    newest,
)
from pgbeat.compress import CHUNK, codec_for_name, decompressing_reader
from pgbeat.compress import compress_step as _compress
from pgbeat.dump import dump_step as _dump
from pgbeat.errors import PgbeatError, VerifyError
from pgbeat.fsutil import private_dir, remove_path
from pgbeat.notify import Event, send_event
from pgbeat.pgclient import MAINTENANCE_DB, client_env, connect, database_exists, ident
from pgbeat.process import Supervised, find_pg_binary
from pgbeat.run import WORK_DIR, Run, StepContext
from pgbeat.settings import Settings, Target
from pgbeat.upload import local_storage
from pgbeat.verify import verify_backup
from pgbeat.verify import verify_step as _verify

log = logging.getLogger(__name__)

# A table name as the manifest has it (as pg_dump wrote it): the scanner's own definition.
TABLE_NAME_RE = sqlscan.TABLE_NAME_RE
# GUCs whose value is a list: each element is quoted on its own when copying database settings.
LIST_SETTINGS = {"search_path", "temp_tablespaces", "session_preload_libraries", "local_preload_libraries"}


class RestoreError(PgbeatError):
    """The restore failed; the original database was left as it was."""


class RestoreRefused(PgbeatError):
    """The user did not confirm, or could not be asked."""

    exit_code = 2


@dataclass
class RestoreInfo:
    """What the confirmation prompt shows."""

    backup: Path
    target: str
    database: str
    server: str
    taken_at: datetime
    size: int
    exists: bool


@dataclass
class RestoreResult:
    backup: Path
    database: str
    server: str
    created: bool
    safety_backup: Path | None
    tables_checked: int
    restore_s: float
    duration_s: float
    steps: dict[str, float] = field(default_factory=dict)


def latest_backup(settings: Settings, target: str | None = None, tier: str | None = None) -> Entry:
    """Return the newest verified backup on the local shelf of `target` (and `tier`), by the database
    server's clock (`catalog.newest`: one dated in the future is chosen only when it is alone)."""
    from pgbeat.clock import ask_server_time

    if target is None:
        if len(settings.targets) != 1:
            raise PgbeatError("--latest needs --target when several targets are configured",
                              hint=f"targets: {', '.join(sorted(settings.targets))}")
        target = next(iter(settings.targets))
    config = settings.target(target)
    entries = [e for e in list_backups(settings.backup_root, target, tier) if e.verified]
    if not entries:
        raise PgbeatError(f"No verified backup of {target}{' (' + tier + ')' if tier else ''} "
                          f"in {settings.backup_root}")
    try:
        now = ask_server_time(config)  # the data's clock; this host's may be as wrong as a worker's
    except PgbeatError:
        now = datetime.now(UTC)
    return newest(entries, now)


def restore_target(settings: Settings, entry: Entry, target_name: str | None) -> Target:
    """The connection to restore into: `--target`, else the target recorded in the manifest."""
    return settings.target(target_name or entry.manifest.target)


def identities_for(target: Target, identity_file: Path | None) -> list | None:
    """The age identities to decrypt with: `--identity`, else the target's `encryption.identity_file`."""
    from pgbeat import crypt

    path = identity_file or (target.encryption.identity_file if target.encryption else None)
    return crypt.load_identities(path) if path else None


def plaintext_of(settings: Settings, entry: Entry, identities: list | None, work: Path) -> Entry:
    """Return `entry` itself, or for an encrypted backup its checked plaintext decrypted into `work`."""
    from pgbeat import crypt
    from pgbeat.verify import check_backup, plaintext_problems

    if not entry.manifest.encryption:
        return entry
    if identities is None:
        crypt.load_identities(None)  # raises the error that says what to pass
    plain = entry.manifest.encryption["plaintext"]
    path = private_dir(work) / plain["file"]
    digests = crypt.decrypt_file(entry.path, path, identities)
    if digests["sha256"] != plain["sha256"] or digests["size"] != plain["size"]:
        raise VerifyError(f"{entry.path.name}: the decrypted content does not match the manifest's plaintext",
                          hint="the file is damaged; use another copy")
    manifest = entry.manifest.model_copy(update={"file": plain["file"], "size": plain["size"],
                                                 "sha256": plain["sha256"], "md5": plain["md5"], "encryption": None})
    codec = manifest.codec if manifest.format == "plain" else codec_for_name(path.name)
    problems = plaintext_problems(check_backup(path, manifest.format, codec, settings), manifest)
    if problems:
        raise VerifyError(f"{plain['file']} (decrypted) failed verification", details=problems)
    return Entry(path=path, manifest=manifest)


# --- the safety backup -------------------------------------------------------------------------------


def safety_backup(settings: Settings, target: Target, database: str, now: datetime) -> Path:
    """Back up `database` as it is now to `BACKUP_ROOT/pre_restore_<target>_<stamp>.sql.gz`, verified."""
    source = target.model_copy(update={"dbname": database, "format": "plain", "jobs": 1,
                                       "compression": target.compression.model_copy(update={"codec": "gzip"})})
    stamp = now.astimezone(settings.tz).strftime(STAMP_FORMAT)
    storage = local_storage(settings)
    name = f"pre_restore_{target.name}_{stamp}.sql.gz"
    while storage.stat(name) is not None:  # two restores within one second
        name = name.replace(".sql.gz", "_1.sql.gz")
    run_id = f"pre-restore-{uuid.uuid4().hex[:12]}"
    run = Run(run_id=run_id, target=target.name, tier="pre_restore", node=settings.node, started_at=now,
              stamp=stamp, name=name, format="plain", codec="gzip", level=source.compression.level,
              work_dir=str(settings.backup_root / WORK_DIR / run_id))
    ctx = StepContext(settings, target_override=source)
    try:
        for step in (_dump, _compress, _verify):
            run = step(ctx, run)
        artifact = run.artifact
        storage.put(manifest_path(artifact), manifest_path(Path(name)).name)
        storage.put(checksum_path(artifact), checksum_path(Path(name)).name)
        storage.put(artifact, name, sha256=run.step("verify").get("sha256"))
    finally:
        remove_path(run.work())
    return settings.backup_root / name


# --- loading into a temporary database ---------------------------------------------------------------


def create_like(conn: psycopg.Connection, new: str, like: str | None) -> None:
    """Create database `new` with the owner, encoding, locale, settings, grants and comment of `like`."""
    if like is None or not database_exists(conn, like):
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(ident(new)))
        return
    row = conn.execute(
        "SELECT pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding), d.datcollate, d.datctype, "
        "d.datconnlimit, t.spcname, d.datacl IS NULL, shobj_description(d.oid, 'pg_database'), d.oid "
        "FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE d.datname = %s", (like,)
    ).fetchone()
    owner, encoding, collate, ctype, connlimit, tablespace, default_acl, comment, oid = row
    conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 OWNER {} ENCODING {} LC_COLLATE {} LC_CTYPE {} "
                         "CONNECTION LIMIT {} TABLESPACE {}").format(
        ident(new), ident(owner), sql.Literal(encoding), sql.Literal(collate), sql.Literal(ctype),
        sql.Literal(connlimit), ident(tablespace)))
    for (setting,) in conn.execute("SELECT unnest(setconfig) FROM pg_db_role_setting "
                                   "WHERE setdatabase = %s AND setrole = 0", (oid,)).fetchall():
        name, _, value = setting.partition("=")
        values = [v.strip() for v in value.split(",")] if name in LIST_SETTINGS else [value]
        conn.execute(sql.SQL("ALTER DATABASE {} SET {} TO {}").format(
            ident(new), ident(name), sql.SQL(", ").join(sql.Literal(v) for v in values)))
    if not default_acl:
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident(new)))
        grants = conn.execute(
            "SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END, a.privilege_type "
            "FROM pg_database d, aclexplode(d.datacl) a WHERE d.datname = %s", (like,)).fetchall()
        for grantee, privilege in grants:
            conn.execute(sql.SQL("GRANT {} ON DATABASE {} TO {}").format(
                sql.SQL(privilege), ident(new), sql.SQL("PUBLIC") if grantee is None else ident(grantee)))
    if comment:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident(new), sql.Literal(comment)))


def load_plain(settings: Settings, target: Target, database: str, entry: Entry, work: Path) -> None:
    """Feed the decompressed dump to `psql -v ON_ERROR_STOP=1` connected to `database`."""
    into = target.model_copy(update={"dbname": database})
    argv = [find_pg_binary("psql", settings.pg_bin_dir), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--no-password",
            "--dbname", into.conninfo()]
    codec = entry.manifest.codec or codec_for_name(entry.path.name)
    proc = Supervised(argv, env=client_env(target, work), stdin=subprocess.PIPE,
                      stdout=subprocess.DEVNULL, name="psql")
    try:
        try:
            with decompressing_reader(entry.path, codec) as f:
                while chunk := f.read(CHUNK):
                    proc.proc.stdin.write(chunk)
            proc.proc.stdin.close()
        except BrokenPipeError:
            pass  # psql stopped at the first error: its exit code and stderr say why
        rc = proc.wait()
    finally:
        proc.stop()
    if rc != 0:
        raise RestoreError(f"psql stopped with exit code {rc} while restoring {entry.path.name}",
                           details=proc.stderr_text()[-8:], hint="the original database was not touched")


def load_archive(settings: Settings, target: Target, database: str, entry: Entry, jobs: int, work: Path) -> None:
    """Restore a custom or directory archive with `pg_restore -j N --exit-on-error`."""
    into = target.model_copy(update={"dbname": database})
    argv = [find_pg_binary("pg_restore", settings.pg_bin_dir), "--exit-on-error", "--no-password",
            "--jobs", str(jobs), "--dbname", into.conninfo(), str(entry.path)]
    proc = Supervised(argv, env=client_env(target, work), stdout=subprocess.DEVNULL,
                      name="pg_restore")
    try:
        rc = proc.wait()
    finally:
        proc.stop()
    if rc != 0:
        raise RestoreError(f"pg_restore stopped with exit code {rc} while restoring {entry.path.name}",
                           details=proc.stderr_text()[-8:], hint="the original database was not touched")


def loaded_rows(conn: psycopg.Connection) -> dict[str, int]:
    """Rows each table received, from the cumulative statistics of a database that saw only the restore.

    Free, where `count(*)` would read every freshly loaded page and set its hint bits (seconds per GB).
    Empty when statistics are off.
    """
    if conn.execute("SHOW track_counts").fetchone()[0] != "on":
        return {}
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return dict(conn.execute("SELECT quote_ident(schemaname) || '.' || quote_ident(relname), "
                             "n_tup_ins - n_tup_del FROM pg_stat_user_tables").fetchall())


def settled_rows(conn: psycopg.Connection, tables: dict[str, int], wait: float = 3.0) -> dict[str, int]:
    """`loaded_rows`, read again for up to `wait` seconds while it disagrees with `tables`: the loading
    sessions flush their statistics as they exit, which may lag our connection by a moment."""
    deadline = time.monotonic() + wait
    while True:
        loaded = loaded_rows(conn)
        if not loaded or all(loaded.get(name) == rows for name, rows in tables.items()) \
                or time.monotonic() > deadline:
            return loaded
        time.sleep(0.1)


def count_rows(conn: psycopg.Connection, tables: dict[str, int]) -> list[str]:
    """Compare row counts in `conn`'s database with the manifest's; return one line per difference.

    The statistics answer first; `count(*)` decides wherever they do not agree with the manifest.
    """
    problems = []
    loaded = settled_rows(conn, tables)
    for name, expected in sorted(tables.items()):
        if not TABLE_NAME_RE.fullmatch(name):
            problems.append(f"{name}: not a table name pgbeat can check")
            continue
        if loaded.get(name) == expected:
            continue
        try:
            actual = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.SQL(name))).fetchone()[0]
        except psycopg.Error as exc:
            problems.append(f"{name}: {str(exc).strip().splitlines()[0]}")
            continue
        if actual != expected:
            problems.append(f"{name}: {actual} rows, the backup recorded {expected}")
    return problems


# --- the swap ----------------------------------------------------------------------------------------


def swap_in(conn: psycopg.Connection, new: str, old: str, retired: str, on_note: Callable[[str], None]) -> None:
    """Replace database `old` with `new` atomically; `old` is renamed to `retired`, then dropped."""
    conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(ident(old)))
    try:
        for attempt in range(5):
            others = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE datname = %s AND pid <> pg_backend_pid()", (old,)).fetchone()[0]
            if others:
                on_note(f"disconnected {others} session(s) from database {old!r} to swap in the restored copy")
            try:
                with conn.transaction():
                    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(ident(old), ident(retired)))
                    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(ident(new), ident(old)))
                break
            except psycopg.errors.ObjectInUse:
                if attempt == 4:
                    raise
                time.sleep(0.5)
    except BaseException:
        if database_exists(conn, old):
            conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(ident(old)))
        raise
    conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(ident(retired)))


# --- the whole flow ----------------------------------------------------------------------------------


def restore(settings: Settings, entry: Entry, target: Target, *, into: str | None = None, jobs: int = 1,
            confirm: Callable[[RestoreInfo], bool], on_step: Callable[[str, str], None] | None = None,
            safety: bool = True, identities: list | None = None,
            now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> RestoreResult:
    """Restore `entry` into `into` (default: the target's database) on `target`'s server, as described above.

    Raise VerifyError if the backup is damaged, RestoreRefused if `confirm` says no, RestoreError if the
    restore or its check fails; in every case the existing database is left as it was.
    """
    note = on_step or (lambda step, text: None)
    database = into or target.dbname
    started, t0 = now(), time.monotonic()
    timings: dict[str, float] = {}
    log_file = settings.backup_root / "logs" / f"{target.name}_restore_{started.astimezone(settings.tz):%Y%m%d}.log"

    def logline(*messages: str) -> None:
        runlog.append(settings, log_file, now(), *messages)

    def timed(step: str, fn: Callable[[], Any]) -> Any:
        note(step, "started")
        t = time.monotonic()
        value = fn()
        timings[step] = round(time.monotonic() - t, 3)
        note(step, "done")
        return value

    logline("=" * 60, f"Iniciando restauração de {entry.path}", f"Destino: {database} em {target.describe()}")
    work = settings.backup_root / WORK_DIR / f"restore-{uuid.uuid4().hex[:12]}"
    stored = entry  # the backup as stored; `entry` becomes its plaintext when it is encrypted
    try:
        timed("verify", lambda: verify_backup(stored.path, settings, checksums_only=True))
        if stored.manifest.encryption:
            entry = timed("decrypt", lambda: plaintext_of(settings, stored, identities, work))
        logline("SUCCESS: Backup íntegro (checksums, descompressão, dump completo)")
        with connect(target, MAINTENANCE_DB) as admin:
            exists = database_exists(admin, database)
        info = RestoreInfo(backup=entry.path, target=target.name, database=database, server=target.describe(),
                           taken_at=entry.manifest.started_at, size=entry.manifest.size, exists=exists)
        if exists and not confirm(info):
            raise RestoreRefused("Restore cancelled: not confirmed", hint="type SIM to confirm, or pass --yes")
        safety_path = None
        if exists and safety:
            safety_path = timed("safety_backup", lambda: safety_backup(settings, target, database, now()))
            logline(f"SUCCESS: Backup de segurança criado: {safety_path}")
        private_dir(work)
        temporary = f"pgbeat_restore_{uuid.uuid4().hex[:12]}"
        try:
            with connect(target, MAINTENANCE_DB) as admin:
                timed("create", lambda: create_like(admin, temporary, database))
            t_restore = time.monotonic()
            if entry.manifest.format == "plain":
                timed("load", lambda: load_plain(settings, target, temporary, entry, work))
            else:
                timed("load", lambda: load_archive(settings, target, temporary, entry, jobs, work))
            restore_s = round(time.monotonic() - t_restore, 3)
            with connect(target, temporary) as conn:
                problems = timed("check", lambda: count_rows(conn, entry.manifest.tables))
            if problems:
                raise RestoreError(f"The restored copy does not match the backup's manifest ({len(problems)} "
                                   "table(s) differ); the original database was not touched", details=problems[:10])
            with connect(target, MAINTENANCE_DB) as admin:
                if exists:
                    retired = f"pgbeat_old_{uuid.uuid4().hex[:12]}"
                    timed("swap", lambda: swap_in(admin, temporary, database, retired,
                                                  lambda text: (note("swap", text), logline(text))))
                else:
                    admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(ident(temporary),
                                                                                   ident(database)))
        finally:
            with connect(target, MAINTENANCE_DB) as admin:
                if database_exists(admin, temporary):
                    admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(ident(temporary)))
        with connect(target, database) as conn:
            missing = [name for name in entry.manifest.tables if TABLE_NAME_RE.fullmatch(name) and conn.execute(
                "SELECT to_regclass(%s) IS NULL", (name,)).fetchone()[0]]
        if missing:
            raise RestoreError(f"After the swap, {len(missing)} table(s) of the backup are missing in {database}",
                               details=missing[:10])
    except PgbeatError as exc:
        logline(f"ERROR: {exc.message}", *(f"  {d}" for d in exc.details))
        send_event(settings, Event(kind="restore_failed", target=target.name, tier=entry.manifest.tier,
                                   run_id=entry.manifest.run_id, node=settings.node, at=now().isoformat(),
                                   file=str(stored.path), reason=exc.message, details=exc.details, hint=exc.hint,
                                   log_file=str(log_file), step="restore"))
        raise
    finally:
        remove_path(work)  # scratch files, e.g. a decrypted copy
    duration = round(time.monotonic() - t0, 3)
    logline(f"SUCCESS: Restauração concluída em {duration}s ({len(entry.manifest.tables)} tabelas conferidas)")
    send_event(settings, Event(kind="restore_succeeded", target=target.name, tier=entry.manifest.tier,
                               run_id=entry.manifest.run_id, node=settings.node, at=now().isoformat(),
                               file=str(stored.path), duration_s=duration, size=stored.manifest.size,
                               log_file=str(log_file)))
    return RestoreResult(backup=stored.path, database=database, server=target.describe(), created=not exists,
                         safety_backup=safety_path, tables_checked=len(entry.manifest.tables), restore_s=restore_s,
                         duration_s=duration, steps=timings)
