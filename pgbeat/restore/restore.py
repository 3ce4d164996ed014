"""Restore with a safety net: the seed's `restore.sh FILE`, safe enough for 3 a.m.

In this order:
1. refuse a database that must never be replaced (postgres, the templates); check the backup (checksums
   against its manifest and `.sha256`, full decompression, completeness);
2. check that the connected user has every right the restore needs, before anything is done, and take
   the restore lock of that database on its server (a second restore of it is refused, exit code 4);
3. get confirmation (the caller asks the user to type `SIM`) when an existing database is overwritten;
4. take a verified safety backup of the current state, `BACKUP_ROOT/pre_restore_<target>_<stamp>.sql.gz`;
5. restore into a temporary database created exactly like the original (every property of its
   `pg_database` row and every `pg_db_role_setting` row), check its tables and row counts against the
   manifest and its properties against the original's, then swap it in: two renames in one transaction
   while the sessions on the original are terminated. Until that commit the original is untouched and
   keeps accepting connections; a failure, a signal or a kill anywhere leaves it as it was and the
   temporary database is dropped (by this process, or from the journal by the next pgbeat run);
6. connect to the restored database and confirm every table of the manifest is there.

pgbeat.restore.journal explains the crash safety (the journal, the lock-based swap, signals).
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgbeat import runlog
from pgbeat.catalog.manifest import (
    STAMP_FORMAT,
    Entry,
    Manifest,
    list_backups,
    manifest_path,
    newest,
    read_manifest,
)
from pgbeat.errors import EXIT_LOCKED, NoTargetsError, PgbeatError, UsageError, VerifyError
from pgbeat.faults import fault_point
from pgbeat.fsutil import CHUNK, hold_dir, private_dir, remove_path
from pgbeat.notify import Event, send_event
from pgbeat.pipeline.record import WORK_DIR, Run, StepContext
from pgbeat.pipeline.runner import Plan, run_steps
from pgbeat.pipeline.steps_table import Step, step
from pgbeat.postgres import sqlscan
from pgbeat.postgres.client import MAINTENANCE_DB, client_env, connect, ident
from pgbeat.postgres.clients import ClientChoice, client_for_major, recorded_major, server_major
from pgbeat.postgres.database import LOCALE_PROVIDERS, DatabaseProperties, database_properties
from pgbeat.postgres.globals import GlobalsApplied
from pgbeat.postgres.process import Supervised, last_error_line
from pgbeat.restore.journal import (
    RETIRED_PREFIX,
    TEMPORARY_PREFIX,
    Interrupted,
    InterruptGuard,
    Journal,
    database_oid,
    drop_database,
    interruptible,
    new_run_id,
    phase_points,
    settle,
)
from pgbeat.settings import PHYSICAL_TIERS, Settings, Target
from pgbeat.steps.compress import codec_for_name, decompressing_reader
from pgbeat.steps.upload import local_storage, shelve
from pgbeat.steps.verify import verify_backup

log = logging.getLogger(__name__)

# A table name as the manifest has it (as pg_dump wrote it): the scanner's own definition.
TABLE_NAME_RE = sqlscan.TABLE_NAME_RE
# GUCs whose value is a list of quoted elements (GUC_LIST_QUOTE, as pg_dump's variable_is_guc_list_quote):
# each element is split out and passed as a literal of its own when database settings are copied.
LIST_SETTINGS = {"local_preload_libraries", "search_path", "session_preload_libraries", "shared_preload_libraries",
                 "temp_tablespaces", "unix_socket_directories"}
# Databases a restore never replaces: the templates every CREATE DATABASE needs, and the one pgbeat's own
# maintenance connection uses (a database cannot rename itself away while it is connected to).
RESERVED_DATABASES = ("template0", "template1", MAINTENANCE_DB)
# The restore lock: a session advisory lock (RESTORE_LOCK_CLASS, crc32 of the database name) on the
# server's maintenance database, held for the whole restore and released by the server if the process dies.
RESTORE_LOCK_CLASS = 0x70676272  # "pgbr"

# Fault points (pgbeat.faults) at the start, middle and end of every phase; the kill matrix tries each.
SAFETY = phase_points("restore", "safety", "the restore lock and journal are held; nothing is created yet",
                      "the safety dump is written, not yet verified or published",
                      "the safety backup is published; nothing is created on the server yet")
CREATE = phase_points("restore", "create", "the journal names the temporary database; it does not exist yet",
                      "the temporary database exists, its settings, grants and comment not yet copied",
                      "the temporary database exists with the original's properties")
LOAD = phase_points("restore", "load", "the temporary database is empty", "the dump is partly loaded",
                    "the dump is loaded")
CHECK = phase_points("restore", "check", "nothing checked yet", "row counts match; properties not yet compared",
                     "the copy matches the manifest and the original's properties")
SWAP = phase_points("restore", "swap", "no session terminated, nothing renamed",
                    "sessions terminated and the original renamed, uncommitted: new connections wait on its lock",
                    "both renames and the copied properties done, not committed")
DROP = phase_points("restore", "drop", "the swap committed; the retired original still exists",
                    "the journal says the retired original is being dropped",
                    "the retired original is dropped; the journal is not yet removed")


class RestoreError(PgbeatError):
    """The restore failed; the original database was left as it was."""


class RestoreRefused(PgbeatError):
    """The user did not confirm, could not be asked, or named a database that is never restored into."""

    exit_code = 2


class RestoreBusy(PgbeatError):
    """Another restore of the same database holds its restore lock."""

    exit_code = EXIT_LOCKED


class MissingRights(RestoreError):
    """The connected user lacks rights the restore or drill needs; `details` names each and its GRANT."""


class RestoreInterrupted(RestoreError):
    """A signal stopped the restore; what was begun was undone (or finished, after the swap)."""


@dataclass
class RestoreInfo:
    """What the confirmation prompt shows."""

    backup: Path
    target: str
    database: str
    server: str
    taken_at: datetime  # by the database server's clock (Manifest.taken_at)
    size: int
    exists: bool
    backup_of: str = ""  # the target the backup was taken of (its manifest's)
    backup_database: str | None = None  # and that target's database then
    sessions: int | None = None  # sessions connected to `database` now (None: not known here)

    @classmethod
    def of(cls, entry: Entry, target: Target, database: str, exists: bool, sessions: int | None = None) -> RestoreInfo:
        m = entry.manifest
        return cls(backup=entry.path, target=target.name, database=database, server=target.describe(),
                   taken_at=m.taken_at, size=m.size, exists=exists, backup_of=m.target,
                   backup_database=m.database.get("dbname"), sessions=sessions)

    @property
    def foreign(self) -> bool:
        """True when the backup is of another target than the one it is restored into."""
        return bool(self.backup_of) and self.backup_of != self.target


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
    globals: GlobalsApplied | None = None  # with --with-globals: what applying them did


def latest_backup(settings: Settings, target: str | None = None, tier: str | None = None) -> Entry:
    """Return the newest verified backup on the local shelf of `target` (and `tier`), by the database
    server's clock (`catalog.newest`: one dated in the future is chosen only when it is alone)."""
    from pgbeat.postgres.clock import ask_server_time

    if target is None:
        if not settings.targets and not settings.servers:
            raise NoTargetsError
        if len(settings.targets) != 1 or settings.servers:  # a whole-server target is many
            known = [*sorted(settings.targets), *(f"{name}.<database>" for name in sorted(settings.servers))]
            raise UsageError("--latest needs --target when several targets are configured",
                              hint=f"targets: {', '.join(known)}")
        target = next(iter(settings.targets))
    config = settings.target(target)
    if tier in PHYSICAL_TIERS:
        raise UsageError(f"--latest restores a logical backup; the {tier} tier holds physical base backups",
                         hint="restore a base backup as a data directory (README, 'Base backups')")
    entries = [e for e in list_backups(settings.backup_root, target, tier, kind="logical") if e.verified]
    if not entries:
        raise PgbeatError(f"No verified backup of {target}{' (' + tier + ')' if tier else ''} "
                          f"in {settings.backup_root}")
    try:
        now = ask_server_time(config)  # the data's clock; this host's may be as wrong as a worker's
    except PgbeatError:
        now = datetime.now(UTC)
    return newest(entries, now)


def refuse_physical(entry: Entry) -> None:
    """Raise RestoreRefused for a base backup: it is a whole cluster's files, not a database's dump."""
    if entry.manifest.format == "tar":
        raise RestoreRefused(f"{entry.path.name} is a physical base backup of the whole cluster, not a dump of "
                             "one database", hint="restore it as a data directory with point-in-time recovery "
                                                  "(README, 'Base backups')")


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
    from pgbeat.steps.verify import check_backup, plaintext_problems

    if not entry.manifest.encryption:
        return entry
    if identities is None:
        crypt.load_identities(None)  # raises the error that says what to pass
    plain = entry.manifest.encryption.plaintext
    path = private_dir(work) / plain.file
    digests = crypt.decrypt_file(entry.path, path, identities)
    if digests["sha256"] != plain.sha256 or digests["size"] != plain.size:
        raise VerifyError(f"{entry.path.name}: the decrypted content does not match the manifest's plaintext",
                          hint="the file is damaged; use another copy")
    manifest = entry.manifest.model_copy(update={"file": plain.file, "size": plain.size,
                                                 "sha256": plain.sha256, "md5": plain.md5, "encryption": None})
    codec = manifest.codec if manifest.format == "plain" else codec_for_name(path.name)
    problems = plaintext_problems(check_backup(path, manifest.format, codec, settings, manifest.pg_dump_version),
                                  manifest)
    if problems:
        raise VerifyError(f"{plain.file} (decrypted) failed verification", details=problems)
    return Entry(path=path, manifest=manifest)


# --- the safety backup -------------------------------------------------------------------------------


def publish_safety_step(ctx: StepContext, run: Run) -> Run:
    """Given a run whose verify step passed, publish its backup at `BACKUP_ROOT/<run.name>` (beside the
    tier folders, where rotation never looks) as the upload step publishes on the shelf; return the
    record with `final_path`."""
    artifact = run.artifact
    manifest = read_manifest(manifest_path(artifact))
    if manifest is None or manifest.run_id != run.run_id:
        raise VerifyError(f"{run.name}: the safety backup has no manifest of its own to publish", step="publish")
    entry = shelve(ctx.settings, run.run_id, artifact, manifest, run.name, ctx.now())
    run.final_path = str(entry.path)
    return run


# The safety backup runs the pipeline's own dump, compress and verify through the runner contract (their
# retries, work folder, fault points), then publishes beside the tiers instead of uploading: it is no
# backup of the target's series (no start ping, no run log, no rotation or notification), and it takes no
# target lock (the restore holds its own lock on the database and must not wait behind a backup).
SAFETY_DUMP = Plan(steps=(step("dump"),), locks=False, announce=False)
SAFETY_REST = Plan(steps=(step("compress"), step("verify"), Step("publish", publish_safety_step)),
                   locks=False, announce=False)


def safety_backup(settings: Settings, target: Target, database: str, now: datetime, run_id: str) -> Path:
    """Back up `database` as it is now to `BACKUP_ROOT/pre_restore_<target>_<stamp>.sql.gz`, verified.

    Its work folder is `BACKUP_ROOT/.work/<run_id>` (the restore's journal names it, for the undo).
    Raise the first step's PgbeatError that is final (transient ones are retried as in a backup).
    """
    source = target.model_copy(update={"dbname": database, "format": "plain", "jobs": 1,
                                       "compression": target.compression.model_copy(update={"codec": "gzip"})})
    stamp = now.astimezone(settings.tz).strftime(STAMP_FORMAT)
    storage = local_storage(settings)
    name = f"pre_restore_{target.name}_{stamp}.sql.gz"
    while storage.stat(name) is not None:  # two restores within one second
        name = name.replace(".sql.gz", "_1.sql.gz")
    run = Run(run_id=run_id, target=target.name, tier="pre_restore", node=settings.node, started_at=now,
              stamp=stamp, name=name, format="plain", codec="gzip", level=source.compression.level,
              work_dir=str(settings.backup_root / WORK_DIR / run_id))
    ctx = StepContext(settings, target_override=source)
    # Held from its creation to the end, between two steps too: another pgbeat process starting meanwhile
    # (a second restore, a backup) sweeps folders that no live process holds.
    with hold_dir(run.work(), create=True):
        try:
            run = run_steps(ctx, run, SAFETY_DUMP)
            fault_point(SAFETY.middle)
            run = run_steps(ctx, run, SAFETY_REST)
        finally:
            remove_path(run.work())
    return settings.backup_root / name


# --- what a database is: its pg_database row and its settings -----------------------------------------


def split_guc_list(value: str) -> list[str]:
    """Split a stored GUC_LIST_QUOTE value (`"$user", public`) into its elements, as PostgreSQL's
    SplitGUCList does: separated by commas, double-quoted elements unquoted, bare ones kept as they are."""
    items, i = [], 0
    while i < len(value) and value[i].isspace():
        i += 1
    while i < len(value):
        if value[i] == '"':
            end, item = i + 1, ""
            while True:
                close = value.find('"', end)
                if close == -1:  # an unterminated quote: PostgreSQL never stores one; keep the rest as it is
                    close = len(value)
                item += value[end:close]
                if value[close + 1:close + 2] != '"':
                    break
                item += '"'
                end = close + 2
            i = close + 1
        else:
            end = i
            while end < len(value) and value[end] != "," and not value[end].isspace():
                end += 1
            item, i = value[i:end], end
        items.append(item)
        while i < len(value) and value[i].isspace():
            i += 1
        if i < len(value) and value[i] == ",":
            i += 1
            while i < len(value) and value[i].isspace():
                i += 1
    return items


def setting_statement(database: str, role: str | None, item: str) -> sql.Composed:
    """The ALTER DATABASE / ALTER ROLE ... IN DATABASE statement that stores one `name=value` item."""
    name, _, value = item.partition("=")
    values = split_guc_list(value) if name.lower() in LIST_SETTINGS else [value]
    assignment = sql.SQL("SET {} TO {}").format(ident(name), sql.SQL(", ").join(sql.Literal(v) for v in values))
    if role is None:
        return sql.SQL("ALTER DATABASE {} {}").format(ident(database), assignment)
    return sql.SQL("ALTER ROLE {} IN DATABASE {} {}").format(ident(role), ident(database), assignment)


def create_like(conn: psycopg.Connection, new: str, like: DatabaseProperties | None) -> None:
    """Create database `new` from template0 with `like`'s owner, encoding, locale provider, collation,
    ctype, ICU locale and rules, and tablespace (or the server's defaults when `like` is None)."""
    options = [sql.SQL("TEMPLATE template0")]
    if like is not None:
        options += [sql.SQL("OWNER {}").format(ident(like.owner)),
                    sql.SQL("ENCODING {}").format(sql.Literal(like.encoding)),
                    sql.SQL("LC_COLLATE {}").format(sql.Literal(like.collate)),
                    sql.SQL("LC_CTYPE {}").format(sql.Literal(like.ctype))]
        if like.locale_provider:
            options.append(sql.SQL("LOCALE_PROVIDER {}").format(sql.SQL(LOCALE_PROVIDERS[like.locale_provider])))
        if like.locale_provider == "i":
            options.append(sql.SQL("ICU_LOCALE {}").format(sql.Literal(like.locale)))
            if like.icu_rules:
                options.append(sql.SQL("ICU_RULES {}").format(sql.Literal(like.icu_rules)))
        elif like.locale_provider == "b":
            options.append(sql.SQL("BUILTIN_LOCALE {}").format(sql.Literal(like.locale)))
        if like.tablespace != "pg_default":  # naming pg_default would need CREATE on it, which owners lack
            options.append(sql.SQL("TABLESPACE {}").format(ident(like.tablespace)))
    conn.execute(sql.SQL("CREATE DATABASE {} {}").format(ident(new), sql.SQL(" ").join(options)))


def recorded_like(conn: psycopg.Connection, manifest: Manifest,
                  note: Callable[[str], None]) -> DatabaseProperties | None:
    """For a restore into a database that does not exist: the properties the backup's database had (the
    manifest's record), or None (the server's defaults) when there is no record or a role they name is
    not on this server (restore with --with-globals to create them); a tablespace this server lacks
    becomes its default."""
    if manifest.properties is None:
        return None
    like = DatabaseProperties.from_record(manifest.properties)
    have = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles")}
    missing = sorted(like.roles() - have)
    if missing:
        note(f"NOTE: the new database is created with this server's defaults: the roles its properties name "
             f"are not here ({', '.join(missing)}); restore with --with-globals to create them")
        return None
    if like.tablespace != "pg_default" and conn.execute("SELECT count(*) FROM pg_tablespace WHERE spcname = %s",
                                                        (like.tablespace,)).fetchone()[0] == 0:
        note(f"NOTE: tablespace {like.tablespace} is not on this server: the new database is in the default one")
        like = replace(like, tablespace="pg_default")
    return like


def create_copy(conn: psycopg.Connection, new: str, like: DatabaseProperties | None, recorded: bool,
                note: Callable[[str], None]) -> DatabaseProperties | None:
    """Create database `new` like `like`; return the properties it got. A recorded database's encoding or
    locale this server cannot give (a locale not installed here, say) falls back to the server's defaults,
    said in a note; a database being replaced must be matched exactly (its failure is the restore's)."""
    try:
        create_like(conn, new, like)
    except psycopg.Error as exc:
        if not (recorded and like is not None):
            raise
        note(f"NOTE: could not create the database as the backup's was ({first_line(exc)}): created with this "
             "server's defaults")
        create_like(conn, new, None)
        return None
    return like


def copy_properties(conn: psycopg.Connection, new: str, like: DatabaseProperties) -> None:
    """Give database `new` `like`'s settings (every pg_db_role_setting row), ACL (entry by entry, in order,
    each from its grantor) and comment."""
    for role, items in like.settings:
        for item in items:
            conn.execute(setting_statement(new, role, item))
    if like.acl is not None:
        for grantee in (sql.SQL("PUBLIC"), ident(like.owner)):
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(ident(new), grantee))
        for item in like.acl:
            grantee = sql.SQL("PUBLIC") if item.grantee is None else ident(item.grantee)
            if item.grantor != like.owner:
                conn.execute(sql.SQL("SET ROLE {}").format(ident(item.grantor)))
            for grantable in (False, True):
                privileges = [sql.SQL(p) for p, g in item.privileges if g is grantable]
                if privileges:
                    conn.execute(sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                        sql.SQL(", ").join(privileges), ident(new), grantee,
                        sql.SQL(" WITH GRANT OPTION" if grantable else "")))
            if item.grantor != like.owner:
                conn.execute("RESET ROLE")
    if like.comment is not None:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident(new), sql.Literal(like.comment)))


def properties_at_swap(conn: psycopg.Connection, database: str, like: DatabaseProperties) -> None:
    """Inside the swap transaction: give the swapped-in `database` `like`'s connection limit,
    `datallowconn` and template flag."""
    if like.connection_limit != -1:
        conn.execute(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(
            ident(database), sql.Literal(like.connection_limit)))
    if not like.allow_connections:
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(ident(database)))
    if like.is_template:
        conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE true").format(ident(database)))


# --- rights, checked before anything is done -------------------------------------------------------


def missing_rights(conn: psycopg.Connection, database: str | None, like: DatabaseProperties | None) -> list[str]:
    """Given a connection to the server, return one line per right its user lacks to create a database
    (a drill, or a restore into a new `database`) or, with `like`, to restore `database` in place; each
    line names the right and the statement that grants it. Empty for a superuser."""
    user, superuser, createdb, createrole = conn.execute(
        "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if superuser:
        return []
    version = conn.info.server_version
    can_set = "SET" if version >= 160000 else "MEMBER"  # what CREATE DATABASE OWNER and SET ROLE need

    def has_role(role: str, how: str) -> bool:
        return conn.execute("SELECT pg_has_role(%s, %s)", (role, how)).fetchone()[0]

    def quoted(name: str) -> str:  # as a DBA would type it in the GRANT: quoted only where needed
        return conn.execute("SELECT quote_ident(%s)", (name,)).fetchone()[0]

    problems = []
    who = quoted(user)
    if not createdb:
        problems.append(f"CREATEDB, to create the {'temporary' if like else 'new'} database: "
                        f"ALTER ROLE {who} CREATEDB;")
    if like is None:
        return problems
    db, owner = quoted(database), quoted(like.owner)
    if not has_role(like.owner, "USAGE"):
        problems.append(f"ownership of database {db} (owned by {owner}), to rename and drop it: "
                        f"GRANT {owner} TO {who}; (or ALTER DATABASE {db} OWNER TO {who};)")
    elif not has_role(like.owner, can_set):
        problems.append(f"membership in {owner}, to create the copy owned by it: GRANT {owner} TO {who};")
    if like.tablespace != "pg_default" and not conn.execute(
            "SELECT has_tablespace_privilege(%s, 'CREATE')", (like.tablespace,)).fetchone()[0]:
        space = quoted(like.tablespace)
        problems.append(f"CREATE on tablespace {space}, where the database lives: "
                        f"GRANT CREATE ON TABLESPACE {space} TO {who};")
    signal_backend = has_role("pg_signal_backend", "USAGE")
    for role, role_super in conn.execute(
            "SELECT DISTINCT r.rolname, r.rolsuper FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid "
            "WHERE a.datid = %s AND a.pid <> pg_backend_pid()", (like.oid,)):
        if role_super:
            problems.append(f"superuser, to terminate the session(s) of superuser {quoted(role)} "
                            f"connected to {db}: close them, or restore as a superuser")
        elif not (signal_backend or has_role(role, "USAGE")):
            problems.append(f"the right to terminate the session(s) of {quoted(role)} connected to "
                            f"{db}: GRANT pg_signal_backend TO {who};")
    for role, items in like.settings:
        for item in items:
            name = item.partition("=")[0]
            context = conn.execute("SELECT context FROM pg_settings WHERE name = %s", (name,)).fetchone()
            if context and context[0] == "superuser" and not (version >= 150000 and conn.execute(
                    "SELECT has_parameter_privilege(%s, 'SET')", (name,)).fetchone()[0]):
                grant = f"GRANT SET ON PARAMETER {name} TO {who};" if version >= 150000 else "restore as a superuser"
                problems.append(f"the right to set {name} (a superuser parameter) in {db}'s settings: {grant}")
        if role is None or role == user:
            continue
        them = quoted(role)
        if conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0]:
            problems.append(f"superuser, to copy the settings of superuser {them} in {db}: restore as a superuser")
        elif not createrole or (version >= 160000 and not has_role(role, "MEMBER WITH ADMIN OPTION")):
            grant = f"ALTER ROLE {who} CREATEROLE;" + (f" GRANT {them} TO {who} WITH ADMIN OPTION;"
                                                       if version >= 160000 else "")
            problems.append(f"the right to copy the settings of role {them} in {db} (ALTER ROLE ... IN DATABASE): "
                            f"{grant}")
    for grantor in sorted({item.grantor for item in like.acl or ()} - {like.owner, user}):
        them = quoted(grantor)
        if not has_role(grantor, can_set):
            problems.append(f"membership in {them}, to copy the grants it made on {db}: GRANT {them} TO {who};")
    return problems


def check_rights(conn: psycopg.Connection, database: str | None, like: DatabaseProperties | None,
                 what: str, where: str) -> None:
    """Raise MissingRights naming every right `missing_rights` finds missing (`what`: "restore into X")."""
    problems = missing_rights(conn, database, like)
    if problems:
        user = conn.execute("SELECT current_user").fetchone()[0]
        raise MissingRights(f"{user} lacks {len(problems)} right(s) to {what} on {where}; nothing was changed",
                            details=problems, hint="grant them (as a superuser, with the statements above) and run "
                                                   "it again")


# --- the server's globals (pgbeat.postgres.globals) ---------------------------------------------------


def missing_roles(conn: psycopg.Connection, manifest: Manifest) -> list[str]:
    """The roles that own the backup's objects or hold grants on them and that the server lacks. Empty for
    a backup without globals: it does not record which roles it needs."""
    if manifest.globals is None:
        return []
    have = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles")}
    return sorted(set(manifest.globals.used_roles) - have)


def check_roles(conn: psycopg.Connection, manifest: Manifest, with_globals: bool, where: str) -> None:
    """Raise MissingRights naming the roles the backup needs that the server lacks, unless `with_globals`
    and its globals file creates them; raise RestoreRefused for `with_globals` without a globals file."""
    if with_globals and manifest.globals is None:
        raise RestoreRefused(f"{manifest.file} has no globals file to apply",
                             hint="it was made before pgbeat stored the server's globals, or they could not be "
                                  "dumped (see its warnings); restore without --with-globals")
    missing = missing_roles(conn, manifest)
    if with_globals:
        missing = [name for name in missing if name not in manifest.globals.roles]
    if missing:
        raise MissingRights(f"{where} lacks {len(missing)} role(s) that own objects of the backup or hold grants "
                            "on them; nothing was changed", details=[f"role {name}" for name in missing],
                            hint="restore with --with-globals to create them from the backup's globals file"
                                 if not with_globals else "create them (the globals file does not)")


def globals_text(stored: Entry, identities: list | None, work: Path) -> str:
    """The SQL of the globals file beside the backup `stored` (decrypted into `work` if encrypted)."""
    from pgbeat import crypt
    from pgbeat.postgres.globals import read_globals

    record = stored.manifest.globals
    assert record is not None
    path = stored.path.with_name(record.file)
    if record.encrypted:
        if identities is None:
            crypt.load_identities(None)  # raises the error that says what to pass
        plain = private_dir(work) / record.file.removesuffix(crypt.SUFFIX)
        digests = crypt.decrypt_file(path, plain, identities)
        if digests["sha256"] != record.plaintext_sha256:
            raise VerifyError(f"{record.file}: the decrypted content does not match the manifest's plaintext",
                              hint="the globals file is damaged; use another copy")
        path = plain
    return read_globals(path, codec_for_name(path.name))


def globals_summary(applied: GlobalsApplied) -> str:
    """One line on what applying the globals did."""
    parts = [f"roles created: {', '.join(applied.created) or 'none'}"]
    if applied.existing:
        parts.append(f"existed, left as they were: {', '.join(applied.existing)}")
    if applied.errors:
        parts.append(f"{len(applied.errors)} statement(s) failed: {applied.errors[-1]}")
    return "; ".join(parts)


def restore_globals(client: ClientChoice, target: Target, stored: Entry, identities: list | None,
                    work: Path) -> GlobalsApplied:
    """Apply the backup's globals to `target`'s server (roles it has are left as they are); raise
    RestoreError if a role the backup needs is still missing afterwards."""
    from pgbeat.postgres.globals import apply_globals

    text = globals_text(stored, identities, work)
    server = target.model_copy(update={"dbname": MAINTENANCE_DB})
    with connect(target, MAINTENANCE_DB) as admin:
        applied = apply_globals(client.program("psql"), server, client_env(target, work), text, admin)
        missing = missing_roles(admin, stored.manifest)
    if missing:
        raise RestoreError(f"After applying the globals, {len(missing)} role(s) the backup needs are missing",
                           details=[f"role {name}" for name in missing] + applied.errors[-5:],
                           hint="the original database was not touched")
    return applied


# --- the restore lock --------------------------------------------------------------------------------


def restore_lock_keys(database: str) -> tuple[int, int]:
    """The advisory lock keys (two int4) of restores into `database`."""
    key = zlib.crc32(database.encode())
    return RESTORE_LOCK_CLASS, key - (1 << 32) if key >= 1 << 31 else key


def hold_restore_lock(settings: Settings, server: Target, database: str) -> psycopg.Connection:
    """Take the restore lock of `database` on `server` and return the session that holds it (close it to
    release). Raise RestoreBusy naming the holder if another restore has it."""
    conn = connect(server, MAINTENANCE_DB)
    try:
        holder_name = f"pgbeat restore {settings.node} pid {os.getpid()}"[:63]
        conn.execute("SELECT set_config('application_name', %s, false)", (holder_name,))
        # The session sits idle for the whole load: no idle timeout may end it, and if this host dies the
        # server's keepalives end it (and release the lock) within a minute or so.
        if conn.info.server_version >= 140000:
            conn.execute("SET idle_session_timeout = 0")
        conn.execute("SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3")
        keys = restore_lock_keys(database)
        if conn.execute("SELECT pg_try_advisory_lock(%s, %s)", keys).fetchone()[0]:
            return conn
        holder = conn.execute(
            "SELECT a.application_name, a.usename, a.client_addr, a.pid FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.classid = %s AND l.objid = %s AND l.objsubid = 2",
            (keys[0], keys[1] & 0xFFFFFFFF)).fetchone()
        held_by = (f"{holder[0] or 'a session'} (PostgreSQL user {holder[1]}, backend pid {holder[3]}"
                   f"{', from ' + str(holder[2]) if holder[2] else ''})") if holder else "a session that just ended"
        raise RestoreBusy(f"Another restore of database {database!r} on {server.describe().rsplit('/', 1)[0]} is "
                          f"running: {held_by}; nothing was changed",
                          hint="wait for it to finish: pgbeat never runs two restores of one database at once")
    except BaseException:
        conn.close()
        raise


# --- loading into a temporary database ---------------------------------------------------------------


def loading_client(settings: Settings, server: Target, conn: psycopg.Connection, manifest: Manifest,
                   force_older: bool = False) -> ClientChoice:
    """Given a connection to the server a backup is loaded into, return the client that loads it: of the
    server's major and the backup's pg_dump's, or newer (psql and pg_restore work with older servers).

    Raise RestoreRefused if the server is older than the pg_dump that made the backup, unless
    `force_older`: a newer pg_dump writes what an older server may reject (pg_dump 17 and newer write
    `SET transaction_timeout`, unknown to PostgreSQL 16 and older), and ON_ERROR_STOP stops there."""
    major = server_major(conn)
    dumped = recorded_major(manifest.pg_dump_version)
    where = server.describe().rsplit("/", 1)[0]
    if major < dumped and not force_older:
        raise RestoreRefused(
            f"Refusing to restore {manifest.file} into PostgreSQL {major} on {where}: it was dumped by pg_dump "
            f"{manifest.pg_dump_version}, of a newer major ({dumped}), whose output older servers may reject "
            "(pg_dump 17 and newer write SET transaction_timeout); nothing was changed",
            hint=f"restore into a server of PostgreSQL {dumped} or newer, or pass --force-older to try anyway")
    program = "psql" if manifest.format == "plain" else "pg_restore"
    return client_for_major(settings, server, max(major, dumped), f"a restore into PostgreSQL {major} on {where} "
                            f"of a backup made by pg_dump {manifest.pg_dump_version or '(unrecorded)'}", program)


def load_plain(client: ClientChoice, target: Target, database: str, entry: Entry, work: Path,
               midway: str | None = None) -> None:
    """Feed the decompressed dump to `client`'s `psql -v ON_ERROR_STOP=1` connected to `database` (fault
    point `midway` after the first block)."""
    into = target.model_copy(update={"dbname": database})
    argv = [client.program("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--no-password",
            "--dbname", into.conninfo()]
    codec = entry.manifest.codec or codec_for_name(entry.path.name)
    proc = Supervised(argv, env=client_env(target, work), stdin=subprocess.PIPE,
                      stdout=subprocess.DEVNULL, name="psql")
    try:
        try:
            with decompressing_reader(entry.path, codec) as f:
                while chunk := f.read(CHUNK):
                    proc.proc.stdin.write(chunk)
                    if midway:
                        fault_point(midway)
                        midway = None
            proc.proc.stdin.close()
        except BrokenPipeError:
            pass  # psql stopped at the first error: its exit code and stderr say why
        rc = proc.wait()
    finally:
        proc.stop()
    if rc != 0:
        raise RestoreError(f"psql stopped with exit code {rc} while restoring {entry.path.name}",
                           details=proc.stderr_text()[-8:], reason=last_error_line(proc.stderr_text()),
                           hint="the original database was not touched")


def load_archive(client: ClientChoice, target: Target, database: str, entry: Entry, jobs: int, work: Path,
                 midway: str | None = None) -> None:
    """Restore a custom or directory archive with `client`'s `pg_restore -j N --exit-on-error` (fault point
    `midway` while it runs)."""
    into = target.model_copy(update={"dbname": database})
    argv = [client.program("pg_restore"), "--exit-on-error", "--no-password",
            "--jobs", str(jobs), "--dbname", into.conninfo(), str(entry.path)]
    proc = Supervised(argv, env=client_env(target, work), stdout=subprocess.DEVNULL,
                      name="pg_restore")
    try:
        if midway:
            fault_point(midway)
        rc = proc.wait()
    finally:
        proc.stop()
    if rc != 0:
        raise RestoreError(f"pg_restore stopped with exit code {rc} while restoring {entry.path.name}",
                           details=proc.stderr_text()[-8:], reason=last_error_line(proc.stderr_text()),
                           hint="the original database was not touched")


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


# If this process or its host dies inside the swap transaction, the server must not keep the original
# locked: an idle transaction ends after 10 s, a lock wait after 30 s, and from PostgreSQL 14 the server
# checks every second, even inside a statement, whether the client is still there.
SWAP_SESSION = ("SET idle_in_transaction_session_timeout = '10s'", "SET lock_timeout = '30s'",
                "SET statement_timeout = '120s'")
SWAP_ATTEMPTS = 3


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def swap_in(server: Target, new: str, old: str, retired: str, original: DatabaseProperties, new_oid: int,
            on_note: Callable[[str], None]) -> None:
    """Swap database `new` in as `old` in one transaction (`old` becomes `retired`), with `original`'s
    connection limit, datallowconn and template flag; the sessions on `old` are terminated while its
    rename waits for them. Raise RestoreError if that cannot be done: `old` is then as it was.

    The first rename holds `old`'s AccessExclusiveLock: sessions connecting meanwhile wait for it (and
    after the commit find the new database), so none slips in between the termination and the renames.
    """
    with connect(server, MAINTENANCE_DB) as swapper, connect(server, MAINTENANCE_DB) as terminator:
        for statement in SWAP_SESSION:
            swapper.execute(statement)
        if swapper.info.server_version >= 140000:
            swapper.execute("SET client_connection_check_interval = '1s'")
        swapping = threading.Event()
        terminated: set[int] = set()
        refused: list[str] = []

        def terminate_sessions() -> None:
            while swapping.is_set():
                try:
                    rows = terminator.execute(
                        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE datid = ANY(%s) "
                        "AND pid <> %s", ([original.oid, new_oid], swapper.info.backend_pid)).fetchall()
                except psycopg.Error as exc:
                    refused.append(first_line(exc))
                    return
                terminated.update(pid for pid, ended in rows if ended)
                time.sleep(0.05)

        for attempt in range(1, SWAP_ATTEMPTS + 1):
            swapping.set()
            thread = threading.Thread(target=terminate_sessions, name="pgbeat-terminate", daemon=True)
            thread.start()
            try:
                with swapper.transaction():
                    swapper.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(ident(old), ident(retired)))
                    fault_point(SWAP.middle)
                    swapper.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(ident(new), ident(old)))
                    properties_at_swap(swapper, old, original)
                    fault_point(SWAP.end)
                break
            except psycopg.errors.ObjectInUse as exc:
                if attempt == SWAP_ATTEMPTS or refused:
                    raise RestoreError(f"Could not swap in the restored copy: {first_line(exc)}",
                                       details=[d for d in (exc.diag.message_detail, *refused) if d],
                                       hint="the original database was not touched; end the sessions or prepared "
                                            "transactions that use it, then restore again") from None
            finally:
                swapping.clear()
                thread.join(5)
    if terminated:
        on_note(f"disconnected {len(terminated)} session(s) from database {old!r} to swap in the restored copy")


# --- the whole flow ----------------------------------------------------------------------------------


def refuse_reserved(database: str) -> None:
    """Raise RestoreRefused (exit code 2) if `database` is not one a restore may replace."""
    if not database.strip():
        raise RestoreRefused("Refusing to restore into a database with an empty name",
                             hint="name the database with --into NAME, or leave --into out")
    if database in RESERVED_DATABASES:
        what = ("the maintenance database pgbeat's own connection uses" if database == MAINTENANCE_DB
                else "a template every CREATE DATABASE copies")
        raise RestoreRefused(f"Refusing to restore into {database!r}: it is {what}; nothing was changed",
                             hint="restore into another database with --into NAME")


def restore(settings: Settings, entry: Entry, target: Target, *, into: str | None = None, jobs: int = 1,
            confirm: Callable[[RestoreInfo], bool], on_step: Callable[[str, str], None] | None = None,
            safety: bool = True, identities: list | None = None, force_older: bool = False,
            with_globals: bool = False, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> RestoreResult:
    """Restore `entry` into `into` (default: the target's database) on `target`'s server, as described above.

    Raise RestoreRefused for a reserved database name or a "no" from `confirm`, VerifyError if the backup
    is damaged, MissingRights if the user lacks a right, RestoreBusy if another restore of the database
    runs, RestoreInterrupted on SIGTERM, SIGHUP or SIGINT, RestoreError if the restore or a check fails;
    RestoreRefused too for a server older than the backup's pg_dump, unless `force_older`.
    Until the swap commits, the existing database is left as it was in every case. With `with_globals`,
    the backup's globals (roles, memberships, role settings, tablespaces) are applied to the server first,
    once confirmed: the roles they create stay, whatever happens next (nothing is ever dropped).
    """
    database = target.dbname if into is None else into
    refuse_reserved(database)
    refuse_physical(entry)
    with interruptible() as guard:
        return _restore(settings, entry, target, database, jobs, confirm, on_step or (lambda step, text: None),
                        safety, identities, force_older, with_globals, now, guard)


def _restore(settings: Settings, entry: Entry, target: Target, database: str, jobs: int,
             confirm: Callable[[RestoreInfo], bool], note: Callable[[str, str], None], safety: bool,
             identities: list | None, force_older: bool, with_globals: bool, now: Callable[[], datetime],
             guard: InterruptGuard) -> RestoreResult:
    started, t0 = now(), time.monotonic()
    timings: dict[str, float] = {}
    log_file = settings.backup_root / "logs" / f"{target.name}_restore_{started.astimezone(settings.tz):%Y%m%d}.log"
    where = target.describe().rsplit("/", 1)[0]

    def logline(*messages: str) -> None:
        runlog.append(settings, log_file, now(), *messages)

    def timed(step: str, fn: Callable[[], Any]) -> Any:
        note(step, "started")
        t = time.monotonic()
        value = fn()
        timings[step] = round(time.monotonic() - t, 3)
        note(step, "done")
        return value

    def report(exc: PgbeatError) -> None:
        logline(f"ERROR: {exc.message}", *(f"  {d}" for d in exc.details))
        send_event(settings, Event(kind="restore_failed", target=target.name, tier=entry.manifest.tier,
                                   run_id=entry.manifest.run_id, node=settings.node, at=now().isoformat(),
                                   file=str(stored.path), reason=exc.message, details=exc.details, hint=exc.hint,
                                   log_file=str(log_file), step="restore"))

    logline("=" * 60, f"Iniciando restauração de {entry.path}", f"Destino: {database} em {target.describe()}")
    run_id = new_run_id()
    work = settings.backup_root / WORK_DIR / f"restore-{run_id}"
    stored = entry  # the backup as stored; `entry` becomes its plaintext when it is encrypted
    journal: Journal | None = None
    begun, swapped, settled = False, False, True
    temporary = f"{TEMPORARY_PREFIX}{run_id}"
    safety_run = f"pre-restore-{run_id}"
    try:
        lock = None
        # From the first step: a decrypted copy in `work` must not outlive a killed run either.
        journal = Journal.begin(settings, run_id, kind="restore", target=target, server="target",
                                temporary=temporary, phase="verify", backup=str(stored.path), database=database,
                                work=[str(work), str(settings.backup_root / WORK_DIR / safety_run)])
        try:
            timed("verify", lambda: verify_backup(stored.path, settings, checksums_only=True,
                                                  with_globals=with_globals))
            if stored.manifest.encryption:
                entry = timed("decrypt", lambda: plaintext_of(settings, stored, identities, work))
            logline("SUCCESS: Backup íntegro (checksums, descompressão, dump completo)")
            with connect(target, MAINTENANCE_DB) as admin:
                original = database_properties(admin, database)
                check_rights(admin, database, original, f"restore into database {database!r}", where)
                check_roles(admin, entry.manifest, with_globals, where)
                client = loading_client(settings, target, admin, entry.manifest, force_older)
                sessions = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                                         "AND pid <> pg_backend_pid()", (database,)).fetchone()[0]
            exists = original is not None
            lock = hold_restore_lock(settings, target, database)
            info = RestoreInfo.of(entry, target, database, exists, sessions)
            if exists and not confirm(info):
                raise RestoreRefused("Restore cancelled: not confirmed", hint="type SIM to confirm, or pass --yes")
            applied = None
            if with_globals:
                applied = timed("globals", lambda: restore_globals(client, target, stored, identities, work))
                note("globals", globals_summary(applied))
                logline(f"SUCCESS: Globals aplicados: {globals_summary(applied)}")
            retired = f"{RETIRED_PREFIX}{run_id}" if exists else None
            journal.write("safety", retired=retired)
            logline(f"Banco temporário: {temporary}; diário {journal.path}")
            fault_point(SAFETY.start)
            safety_path = None
            if exists and safety:
                safety_path = timed("safety_backup",
                                    lambda: safety_backup(settings, target, database, now(), safety_run))
                logline(f"SUCCESS: Backup de segurança criado: {safety_path}")
            fault_point(SAFETY.end)
            private_dir(work)

            note("create", "started")
            t = time.monotonic()
            with connect(target, MAINTENANCE_DB) as admin:
                original = database_properties(admin, database)  # as it is now, after the safety backup
                if (original is not None) != exists:
                    raise RestoreError(f"Database {database!r} was {'dropped' if exists else 'created'} by someone "
                                       "else while the restore ran; nothing was changed")
                journal.write("create", database_oid=original and original.oid,
                              datallowconn=original and original.allow_connections)
                # A database that is not there gets the one the backup was taken of (owner, locale,
                # settings, ACL, comment) where this server can give them.
                like = original if original is not None else recorded_like(admin, entry.manifest, logline)
                fault_point(CREATE.start)
                like = create_copy(admin, temporary, like, original is None, logline)
                journal.write("create", temporary_oid=database_oid(admin, temporary))
                fault_point(CREATE.middle)
                if like is not None:
                    copy_properties(admin, temporary, like)
            timings["create"] = round(time.monotonic() - t, 3)
            note("create", "done")
            fault_point(CREATE.end)

            journal.write("load")
            fault_point(LOAD.start)
            t_restore = time.monotonic()
            if entry.manifest.format == "plain":
                timed("load", lambda: load_plain(client, target, temporary, entry, work, midway=LOAD.middle))
            else:
                timed("load", lambda: load_archive(client, target, temporary, entry, jobs, work, midway=LOAD.middle))
            restore_s = round(time.monotonic() - t_restore, 3)
            fault_point(LOAD.end)

            journal.write("check")
            fault_point(CHECK.start)
            with connect(target, temporary) as conn:
                problems = timed("check", lambda: count_rows(conn, entry.manifest.tables))
            if problems:
                raise RestoreError(f"The restored copy does not match the backup's manifest ({len(problems)} "
                                   "table(s) differ); the original database was not touched", details=problems[:10])
            fault_point(CHECK.middle)
            if original is not None:
                with connect(target, MAINTENANCE_DB) as admin:
                    copy = database_properties(admin, temporary)
                differences = original.differences(copy, skip=DatabaseProperties.AT_SWAP + DatabaseProperties.BUILT)
                if differences:
                    raise RestoreError("The temporary copy did not get the original's database properties; the "
                                       "original database was not touched", details=differences)
                if copy.collation_version != original.collation_version:
                    logline(f"NOTE: {database} had collation version {original.collation_version}; the restored "
                            f"copy was built with {copy.collation_version}, the version of today's library")
            fault_point(CHECK.end)

            journal.write("swap")
            fault_point(SWAP.start)
            if original is not None:
                timed("swap", lambda: swap_in(target, temporary, database, retired, original,
                                              journal.record.temporary_oid,
                                              lambda text: (note("swap", text), logline(text))))
            else:
                with connect(target, MAINTENANCE_DB) as admin:
                    admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(ident(temporary), ident(database)))
                    if like is not None:
                        properties_at_swap(admin, database, like)
            swapped = True
            fault_point(DROP.start)
            if retired is not None:
                journal.write("drop")
                fault_point(DROP.middle)
                with connect(target, MAINTENANCE_DB) as admin:
                    drop_database(admin, retired)
                fault_point(DROP.end)
            journal.close()
            journal = None
        finally:
            try:
                if journal is not None:  # stopped midway: finish or undo now, else leave it to the next run
                    begun = journal.record.phase not in ("verify",)
                    settled, committed = _settle_own(target, journal, guard, logline)
                    swapped = swapped or committed
            finally:
                if lock is not None:
                    lock.close()
        if original is None or original.allow_connections:
            with connect(target, database) as conn:
                missing = [name for name in entry.manifest.tables if TABLE_NAME_RE.fullmatch(name) and conn.execute(
                    "SELECT to_regclass(%s) IS NULL", (name,)).fetchone()[0]]
            if missing:
                raise RestoreError(f"After the swap, {len(missing)} table(s) of the backup are missing in {database}",
                                   details=missing[:10])
    except Interrupted as exc:
        error = RestoreInterrupted(_interrupted_message(exc.signal_name, database, begun, swapped, settled))
        report(error)
        raise error from None
    except PgbeatError as exc:
        report(exc)
        raise
    except psycopg.Error as exc:
        error = RestoreError(f"PostgreSQL refused the restore: {first_line(exc)}",
                             hint="the original database was not touched" if not swapped else None)
        report(error)
        raise error from None
    finally:
        remove_path(work)  # scratch files, e.g. a decrypted copy
    duration = round(time.monotonic() - t0, 3)
    logline(f"SUCCESS: Restauração concluída em {duration}s ({len(entry.manifest.tables)} tabelas conferidas)")
    if safety_path is not None:  # only now: a failed attempt never costs an older safety backup
        prune_safety_backups(settings, target.name, logline)
    send_event(settings, Event(kind="restore_succeeded", target=target.name, tier=entry.manifest.tier,
                               run_id=entry.manifest.run_id, node=settings.node, at=now().isoformat(),
                               file=str(stored.path), duration_s=duration, size=stored.manifest.size,
                               log_file=str(log_file)))
    return RestoreResult(backup=stored.path, database=database, server=target.describe(), created=not exists,
                         safety_backup=safety_path, tables_checked=len(entry.manifest.tables), restore_s=restore_s,
                         duration_s=duration, steps=timings, globals=applied)


def prune_safety_backups(settings: Settings, target: str, logline: Callable[..., None]) -> None:
    """Keep `target`'s newest `safety_backups` safety backups, by the server's clock; never fail the restore
    that called it (what could not be removed now goes at the next one, or at `pgbeat rotate`)."""
    from pgbeat.steps.rotate import rotate_safety_backups, rotation_now

    try:
        plan = rotate_safety_backups(settings, target, rotation_now(settings, target))
    except (PgbeatError, OSError) as exc:
        logline(f"WARNING: safety backups not rotated ({getattr(exc, 'message', exc)})")
        return
    if plan.remove:
        logline(f"Removidos {len(plan.remove)} backup(s) de segurança antigo(s): "
                f"{', '.join(e.path.name for e in plan.remove)}")


def _settle_own(server: Target, journal: Journal, guard: InterruptGuard,
                logline: Callable[..., None]) -> tuple[bool, bool]:
    """Finish or undo this process's own unfinished run now (signals wait meanwhile); return whether it
    is settled and whether its swap had committed. If the server cannot be reached, the journal stays for
    the next pgbeat run on this host."""
    with guard.masked():
        try:
            committed, lines = settle(server, journal.record)
        except PgbeatError as exc:
            journal.release()
            logline(f"ERROR: could not undo yet ({exc.message}); the next pgbeat run on this host will, from "
                    f"{journal.path}")
            return False, False
        journal.close()
        if lines:
            logline(*lines)
        return True, committed


def _interrupted_message(signal_name: str, database: str, begun: bool, swapped: bool, settled: bool) -> str:
    later = "" if settled else " (the next pgbeat run on this host finishes that from the journal)"
    if swapped:
        return (f"Restore interrupted by {signal_name} after the swap: {database!r} holds the restored backup, its "
                f"retired original was dropped{later}; the final table check did not run")
    undone = f"; what the restore had begun was undone{later}" if begun else ""
    return f"Restore interrupted by {signal_name}: {database!r} was left as it was{undone}"
